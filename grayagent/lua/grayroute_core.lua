-- grayroute_core: the proxy-independent half of grayagent's routing in Lua (LuaJIT 2.1, `bit` library).
-- It means exactly what grayagent/rules/routing.py means (docs/routing-semantics.md); every adapter (Envoy's
-- Lua filter, lua-nginx-module's grayroute_nginx) reads request values its own way and calls these functions.
-- Verified against Envoy 1.40 and nginx 1.22 (docs/notes/envoy-probe.md, tests/test_fidelity_three_way.py).
--
-- Lua numbers are doubles: every integer here stays below 2^53, so arithmetic on them is exact.
-- `bit.*` results are SIGNED int32; `% 4294967296` turns one into its uint32 value.

local bit = require("bit")
local band, bor, bxor, rshift, lshift, tobit = bit.band, bit.bor, bit.bxor, bit.rshift, bit.lshift, bit.tobit
local byte, sub, find = string.byte, string.sub, string.find
local floor = math.floor

local M = {}

-- x * 0x5bd1e995 mod 2^32, exact: split x into 16-bit halves so no partial product exceeds 2^34.
local M_LO, M_HI = 0xe995, 0x5bd1
local function mul_m(x)
  local lo = band(x, 0xffff)
  local hi = rshift(x, 16)
  return tobit(lo * M_LO + lshift(hi * M_LO + lo * M_HI, 16))
end

-- ngx_murmur_hash2 (src/core/ngx_murmurhash.c) over the bytes of s; a uint32 (0 .. 2^32-1).
function M.murmur2(s)
  local len = #s
  local h = tobit(len)
  local i = 1
  while len - i >= 3 do
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

-- parts: array of {boundary, upstream} as rendered by grayagent (routing.split_parts): the first part
-- with bucket < boundary wins; the last part takes the rest (its boundary is not read).
function M.pick(bucket, parts)
  for i = 1, #parts - 1 do
    if bucket < parts[i][1] then return parts[i][2] end
  end
  return parts[#parts][2]
end

-- First match of (?:^|SEP)[ \t]*NAME=([^SEP]*) (skip_ws) or (?:^|SEP)NAME=([^SEP]*) in s; "" if none
-- (routing.COOKIE_PATTERN / QUERY_PATTERN). NAME is literal and case-sensitive, never starts with blanks.
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

function M.cookie_value(cookie_header, name) return field_value(cookie_header, name, ";", true) end
function M.query_value(query, name) return field_value(query, name, "&", false) end

-- Raw path and raw query of a request target: split at the first "?", nothing decoded.
function M.split_target(target)
  local q = find(target, "?", 1, true)
  if q then return sub(target, 1, q - 1), sub(target, q + 1) end
  return target, ""
end

-- Peer addresses. "1.2.3.4:5678" or "1.2.3.4" -> {4, n}; "[2001:db8::1]:5678" or "2001:db8::1" -> {6, groups}.
-- An IPv4-mapped IPv6 peer (::ffff:a.b.c.d) counts as IPv4, as nginx's geo module does.
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
      if g:find(".", 1, true) then
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

function M.parse_peer(addr)
  if addr == nil then return nil end
  local v6 = addr:match("^%[(.-)%]:%d+$")
  if v6 == nil and find(addr, ":", 1, true) and not addr:match("^[%d%.]+:%d+$") then v6 = addr end
  if v6 then
    local g = parse_v6(v6)
    if not g then return nil end
    if g[1] == 0 and g[2] == 0 and g[3] == 0 and g[4] == 0 and g[5] == 0 and g[6] == 0xffff then
      return {4, g[7] * 65536 + g[8]}
    end
    return {6, g}
  end
  local n = parse_v4(addr:match("^([%d%.]+):%d+$") or addr)
  if n then return {4, n} end
  return nil
end

-- cidr: {4, network_number, prefix_len} or {6, {8 groups}, prefix_len}, host bits already zero.
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

function M.in_cidrs(list, peer)
  for i = 1, #list do
    if cidr_contains(list[i], peer) then return true end
  end
  return false
end

-- LuaJIT's math.random starts from the same fixed seed in every Lua state (and x-request-id can come
-- from the client), so seed each state once from /dev/urandom: at its first draw, not at load, since
-- nginx loads this module in its master (init_by_lua) and every forked worker would share one sequence.
local seeded = false
local function seed_once()
  seeded = true
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

function M.random_uint32()
  if not seeded then seed_once() end
  return floor(math.random() * 4294967296)
end

-- One string matcher (routing.string_matches). match = {kind = "exact"|"prefix"|"in"|"regex"|"present"|"list",
-- values = {...}, present = bool, set = an id_set for "list"}; value is "" when absent. regex_find(value, pattern) -> bool is the
-- adapter's regex engine (PCRE in nginx), since plain Lua has none.
function M.string_matches(match, value, regex_find)
  local kind = match.kind
  if kind == "present" then return (value ~= "") == match.present end
  if value == "" then return false end
  local values = match.values
  if kind == "exact" then return value == values[1] end
  if kind == "prefix" then return sub(value, 1, #values[1]) == values[1] end
  if kind == "in" then
    for i = 1, #values do
      if value == values[i] then return true end
    end
    return false
  end
  if kind == "regex" then return regex_find(value, values[1]) end
  if kind == "list" then return match.set ~= nil and match.set[value] == true end
  return false
end

-- A named ID list as the renderers serialise it: one string, IDs joined by "\n" (IDs hold no control
-- characters). One string constant instead of a table constructor: LuaJIT allows 65,536 constants per
-- function, and a list may hold 1,000,000 IDs. Returns the set {id = true}.
function M.id_set(joined)
  local set = {}
  for id in string.gmatch(joined, "[^\n]+") do set[id] = true end
  return set
end

-- The split decision (routing.route step 2). split = {salt, parts, key = {kind, name} or nil,
-- when_key_missing = "default" | "random"}; key_value is the key's value ("" = absent).
-- Returns the upstream name, or nil for "the service's default upstream".
function M.split_upstream(split, key_value)
  if split.key ~= nil and key_value ~= "" then
    return M.pick(M.murmur2(split.salt .. key_value), split.parts)
  end
  if split.key ~= nil and split.when_key_missing ~= "random" then return nil end
  return M.pick(M.random_uint32(), split.parts)
end

-- The whole decision (routing.route): returns upstream, rule name (or nil), and how ("rule", "split",
-- "random", "default"). svc = {default, rules = {{name, to, conds = {{input = i, match = ...} or
-- {cidr = j}}}}, cidrs = {lists}, split}; value_of(req, i) reads input i ("" = absent), peer_of(req)
-- the parsed direct peer; req is the adapter's per-request state (values are read once each).
-- With split.anon (whenKeyMissing: cookie), a 4th result is the fresh visitor ID to set, from req.new_id().
function M.decide(svc, req, value_of, peer_of, regex_find)
  local rules = svc.rules
  for r = 1, #rules do
    local rule = rules[r]
    local holds = true
    local conds = rule.conds
    for c = 1, #conds do
      local cond = conds[c]
      if cond.cidr ~= nil then
        holds = M.in_cidrs(svc.cidrs[cond.cidr], peer_of(req))
      else
        holds = M.string_matches(cond.match, value_of(req, cond.input), regex_find)
      end
      if not holds then break end
    end
    if holds then return rule.to, rule.name, "rule" end
  end
  local split = svc.split
  if split == nil then return svc.default, nil, "default" end
  local key = ""
  if split.key ~= nil then key = value_of(req, split.key_input) end
  if key == "" and split.anon ~= nil then
    local upstream, by, fresh = M.anon_split(split, value_of(req, split.anon.input), req.new_id)
    return upstream, nil, by, fresh
  end
  local upstream = M.split_upstream(split, key)
  if upstream == nil then return svc.default, nil, "default" end
  if split.key ~= nil and key ~= "" then return upstream, nil, "split" end
  return upstream, nil, "random"
end

-- ------------------------------------------------------------------ anonymous visitors
-- whenKeyMissing: cookie (routing.anonymous_split). split.anon = {name, attributes (routing.cookie_attributes),
-- input (nginx dynamic mode: the cookie's input index)}.

-- The visitor ID a cookie value holds (routing.anonymous_id: 32 lowercase hex digits, spaces and tabs
-- around it ignored), or nil.
function M.anon_id(value)
  -- Trimmed by hand: a pattern like "^%s*(.-)%s*$" retries at each blank of a long run (quadratic).
  local first = find(value, "[^ \t]")
  if first == nil then return nil end
  local last = #value
  while byte(value, last) == 32 or byte(value, last) == 9 do last = last - 1 end
  if last - first ~= 31 then return nil end
  local id = sub(value, first, last)
  if find(id, "[^0-9a-f]") then return nil end
  return id
end

-- The split of a keyless request: upstream, how ("split" on the visitor's ID, "random" on a fresh one), and
-- the fresh ID to set (nil when the cookie held one). new_id() -> 32 lowercase hex digits.
function M.anon_split(split, cookie_value, new_id)
  local id = M.anon_id(cookie_value)
  if id ~= nil then return M.pick(M.murmur2(split.salt .. id), split.parts), "split", nil end
  id = new_id()
  return M.pick(M.murmur2(split.salt .. id), split.parts), "random", id
end

function M.set_cookie(anon, id) return anon.name .. "=" .. id .. anon.attributes end

-- A fresh ID where the proxy has no random request ID of its own (Envoy): 16 bytes of /dev/urandom, read
-- through a handle each Lua state opens at its first draw (never in nginx's master: forked workers would
-- share its buffer); without io, four draws of the seeded math.random.
local urandom = nil
function M.new_anon_id()
  if urandom == nil then urandom = (io and io.open("/dev/urandom", "rb")) or false end
  local b = urandom and urandom:read(16)
  if b and #b == 16 then
    return string.format("%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x", byte(b, 1, 16))
  end
  return string.format("%08x%08x%08x%08x", M.random_uint32(), M.random_uint32(), M.random_uint32(),
                       M.random_uint32())
end

return M
