-- grayroute_nginx: the lua-nginx-module adapter (nginx dynamic mode, grayagent/targets/nginx_dynamic.py).
-- The skeleton rendered by grayagent/targets/nginx_dynamic_render.py calls, with its own constants:
--   access(service, fp)  access_by_lua: set $ga_upstream from the routing data pushed for skeleton fp;
--                        with no data (an nginx restart empties the shared dict), or on any error, the
--                        skeleton's `set $ga_upstream <default>` stands: never an error for the client;
--   init(token_file)     init_by_lua, in nginx's master (as root): read the push secret from its 0600 file,
--                        so that no rendered file holds it; workers inherit it at fork;
--   push(fp)             content_by_lua on the loopback control server: POST the routing data, signed
--                        (X-Grayagent-Signature: base64 HMAC-SHA1 over "<epoch>\n" .. body) when init ran;
--                        refused when its (epoch, version) is below the one held (a replayed old push);
--   version(fp)          content_by_lua on the loopback control server: "skeleton <fp>\ndata <v> <digest>".
--
-- The routing data is a Lua chunk made only of table constructors (the agent serialises it with
-- envoy_render.lua_literal). It runs with an EMPTY environment, so it can only build data: no globals,
-- no library, no I/O. Each worker parses it once per pushed generation, then routes from the parsed table.
-- Keys are per skeleton fingerprint (gen:<fp>, blob:<fp>:<gen>), so workers of an old skeleton (draining
-- after a reload) keep their data while the agent pushes the new skeleton's data.

local core = require("grayroute_core")
local ngx = ngx
local re_find = ngx.re.find
local DICT = ngx.shared.grayagent_routes

local M = {}

-- This worker's parsed data: skeleton fingerprint, generation it was parsed at, the table.
local cached_fp, cached_gen, cached = nil, nil, nil

-- The push secret, read once by init(); token_file stays nil when the skeleton has no init (unsigned pushes).
local token, token_file = nil, nil

local function is_string(v) return type(v) == "string" end
local function is_index(v, n) return type(v) == "number" and v >= 1 and v <= n and v % 1 == 0 end

local MATCH_KINDS = {exact = true, prefix = true, ["in"] = true, regex = true, present = true, list = true}
local INPUT_KINDS = {header = true, cookie = true, query = true, path = true}

-- split.anon (whenKeyMissing: cookie): the cookie's input, and the Set-Cookie parts as plain header text.
local function anon_ok(anon, inputs)
  return type(anon) == "table" and is_index(anon.input, inputs) and is_string(anon.name)
    and anon.name:match("^[%w._-]+$") ~= nil and is_string(anon.attributes)
    and anon.attributes:match("^[%w =/;-]+$") ~= nil
end

-- Everything access() relies on, so that a bad push is refused instead of failing requests.
local function check_service(name, svc)
  if type(svc) ~= "table" or type(svc.upstreams) ~= "table" then return "service " .. name .. ": no upstreams" end
  local function known(up) return is_string(up) and is_string(svc.upstreams[up]) end
  if not known(svc.default) then return "service " .. name .. ": unknown default upstream" end
  if type(svc.inputs) ~= "table" or type(svc.cidrs) ~= "table" or type(svc.rules) ~= "table" then
    return "service " .. name .. ": malformed"
  end
  for i = 1, #svc.inputs do
    local f = svc.inputs[i]
    if type(f) ~= "table" or not INPUT_KINDS[f[1]] or (f[1] ~= "path" and not is_string(f[2])) then
      return "service " .. name .. ": bad input " .. i
    end
  end
  for _, rule in ipairs(svc.rules) do
    if type(rule) ~= "table" or not known(rule.to) or type(rule.conds) ~= "table" then
      return "service " .. name .. ": bad rule"
    end
    for _, cond in ipairs(rule.conds) do
      if cond.cidr ~= nil then
        if not is_index(cond.cidr, #svc.cidrs) then return "service " .. name .. ": bad cidr index" end
      elseif not is_index(cond.input, #svc.inputs) or type(cond.match) ~= "table"
          or not MATCH_KINDS[cond.match.kind] or type(cond.match.values) ~= "table" then
        return "service " .. name .. ": bad condition in rule " .. tostring(rule.name)
      end
    end
  end
  local split = svc.split
  if split ~= nil then
    if type(split.parts) ~= "table" or #split.parts == 0 or not is_string(split.salt) then
      return "service " .. name .. ": bad split"
    end
    for _, part in ipairs(split.parts) do
      if type(part) ~= "table" or type(part[1]) ~= "number" or not known(part[2]) then
        return "service " .. name .. ": bad split part"
      end
    end
    if split.key ~= nil and not is_index(split.key_input, #svc.inputs) then
      return "service " .. name .. ": bad split key"
    end
    if split.anon ~= nil and not anon_ok(split.anon, #svc.inputs) then
      return "service " .. name .. ": bad anonymous cookie"
    end
  end
  return nil
end

-- Leading and trailing spaces and tabs are not part of a header value (RFC 9110 OWS; routing.py strips both).
local function strip_ows(v)
  return (v:match("^[ \t]*(.-)[ \t]*$"))
end

local function header_var(name)
  return "http_" .. name:gsub("-", "_")
end

-- Named ID lists: data.lists = {name = "id\nid\n..."} (optional); each becomes a set once per parse.
local function link_lists(data)
  local sets = {}
  if data.lists == nil then return sets end
  if type(data.lists) ~= "table" then return nil, "malformed lists" end
  for name, joined in pairs(data.lists) do
    if not is_string(name) or not is_string(joined) then return nil, "malformed list " .. tostring(name) end
    sets[name] = core.id_set(joined)
  end
  return sets
end

local function attach_sets(name, svc, sets)
  for _, rule in ipairs(svc.rules) do
    for _, cond in ipairs(rule.conds) do
      local match = cond.match
      if match ~= nil and match.kind == "list" then
        match.set = sets[match.values[1]]
        if match.set == nil then return "service " .. name .. ": unknown list " .. tostring(match.values[1]) end
      end
    end
  end
  return nil
end

-- Parse pushed data in an empty environment and check its shape. Returns the table, or nil and why.
local function load_data(src)
  -- Text only: LuaJIT bytecode is not verified, and crafted bytecode escapes any sandbox.
  if src:byte(1) == 27 then return nil, "bytecode refused" end
  local chunk, err = loadstring(src, "=grayagent-routes")
  if chunk == nil then return nil, "not Lua: " .. tostring(err) end
  setfenv(chunk, {})
  local ok, data = pcall(chunk)
  if not ok then return nil, "failed to build: " .. tostring(data) end
  if type(data) ~= "table" or type(data.version) ~= "number" or not is_string(data.digest)
      or not is_string(data.fingerprint) or type(data.services) ~= "table" then
    return nil, "not grayagent routing data"
  end
  local sets, problem = link_lists(data)
  if sets == nil then return nil, problem end
  for name, svc in pairs(data.services) do
    problem = check_service(tostring(name), svc) or attach_sets(tostring(name), svc, sets)
    if problem then return nil, problem end
    -- nginx variable names, computed once per parse instead of per request.
    for _, f in ipairs(svc.inputs) do
      if f[1] == "header" then f.var = header_var(f[2]) end
    end
  end
  return data
end

local function current(fp)
  local gen = DICT:get("gen:" .. fp)
  if gen == nil then
    -- The key is gone: either nginx restarted (this fresh worker has nothing cached: defaults), or a newer
    -- skeleton's push replaced this skeleton's data while this worker drains (keep what it parsed).
    if cached_fp == fp then return cached end
    return nil
  end
  if cached_fp == fp and cached_gen == gen then return cached end
  local src = DICT:get("blob:" .. fp .. ":" .. gen)
  if src == nil then
    if cached_fp == fp then return cached end
    return nil
  end
  local data, err = load_data(src)
  if data == nil then
    ngx.log(ngx.ERR, "grayagent: stored routing data unusable, serving defaults: ", err)
    return nil
  end
  cached_fp, cached_gen, cached = fp, gen, data
  return data
end

-- ------------------------------------------------------------------ request values

local function value_of(req, i)
  local v = req[i]
  if v ~= nil then return v end
  local f = req.svc.inputs[i]
  local kind = f[1]
  local var = ngx.var
  if kind == "header" then
    v = strip_ows(var[f.var] or "")     -- nginx 1.22: the first value; Cookie joined with "; "
  elseif kind == "cookie" then
    v = core.cookie_value(var.http_cookie or "", f[2])
  elseif kind == "query" then
    v = core.query_value(var.args or "", f[2])
  else
    v = core.split_target(var.request_uri or "")
  end
  req[i] = v
  return v
end

local function peer_of(req)
  if req.peer == nil then req.peer = core.parse_peer(ngx.var.remote_addr) or false end
  return req.peer or nil
end

-- PCRE, byte mode (no "u" flag), like nginx's map regexes; "jo": JIT, compiled once per worker.
local function regex_find(value, pattern)
  local from, _, err = re_find(value, pattern, "jo")
  if err then ngx.log(ngx.ERR, "grayagent: regex failed: ", err) end
  return from ~= nil
end

-- Anonymous visitors: nginx's own $request_id (16 random bytes as lowercase hex), as in reload mode. A header
-- set here in the access phase goes out with the proxied response, after the upstream's own Set-Cookie lines.
local function request_id() return ngx.var.request_id end

local function set_anon_cookie(anon, id)
  ngx.header["Set-Cookie"] = core.set_cookie(anon, id)
end

local function route(service, fp)
  local data = current(fp)
  if data == nil then return end
  local svc = data.services[service]
  if svc == nil then return end
  local upstream, _, _, fresh = core.decide(svc, {svc = svc, new_id = request_id}, value_of, peer_of, regex_find)
  ngx.var.ga_upstream = svc.upstreams[upstream]
  if fresh ~= nil then set_anon_cookie(svc.split.anon, fresh) end
end

function M.access(service, fp)
  local ok, err = pcall(route, service, fp)
  if not ok then ngx.log(ngx.ERR, "grayagent: routing failed, default upstream: ", err) end
end

-- ------------------------------------------------------------------ control endpoints

local function answer(status, text)
  ngx.status = status
  ngx.header.content_type = "text/plain"
  ngx.say(text)
  return ngx.exit(ngx.HTTP_OK)  -- the status is already set; this only ends the request
end

function M.init(path)
  token_file = path
  local f = io.open(path, "rb")
  if f then
    local text = f:read("*a") or ""
    f:close()
    token = text:match("^%s*(%x+)%s*$")
    if token ~= nil and #token ~= 64 then token = nil end
  end
  if token == nil then
    ngx.log(ngx.ERR, "grayagent: no push token in ", path, ": every push is refused until nginx reloads")
  end
end

-- The epoch a push claims, checked against its signature when init ran; nil and why when it fails.
local function push_epoch(body)
  local headers = ngx.req.get_headers()
  local epoch = headers["x-grayagent-epoch"]
  if type(epoch) ~= "string" or not epoch:match("^%d%d?%d?%d?%d?%d?%d?%d?%d?$") then
    if token_file == nil and epoch == nil then return 0 end
    return nil, "missing or bad X-Grayagent-Epoch"
  end
  if token_file ~= nil then
    if token == nil then return nil, "nginx read no push token at init (" .. token_file .. "); reload nginx" end
    local signed = headers["x-grayagent-signature"]
    if signed ~= ngx.encode_base64(ngx.hmac_sha1(token, epoch .. "\n" .. body)) then
      return nil, "missing or wrong X-Grayagent-Signature"
    end
  end
  return tonumber(epoch)
end

function M.push(fp)
  if ngx.req.get_method() ~= "POST" then return answer(405, "POST the routing data") end
  if token_file ~= nil and token == nil then
    return answer(403, "refused: nginx read no push token at init (" .. token_file .. "); reload nginx")
  end
  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if body == nil then
    local path = ngx.req.get_body_file()
    if path ~= nil then
      local f = io.open(path, "rb")
      if f then body = f:read("*a"); f:close() end
    end
  end
  if body == nil or body == "" then return answer(400, "refused: empty body") end
  local epoch, why = push_epoch(body)
  if epoch == nil then return answer(403, "refused: " .. why) end
  local data, err = load_data(body)
  if data == nil then return answer(400, "refused: " .. err) end
  -- Replay: never below what is held. The agent goes back on purpose only with a higher epoch.
  local held_epoch, held_version = DICT:get("held:epoch") or 0, DICT:get("held:version") or 0
  if epoch < held_epoch or (epoch == held_epoch and data.version < held_version) then
    return answer(409, string.format("refused: version %d (epoch %d) is older than the one held, %d (epoch %d)",
                                     data.version, epoch, held_version, held_epoch))
  end
  local key = data.fingerprint
  -- Each push is a new key (blob:<fp>:<generation>), then the generation moves: a failed store (a full
  -- dict) never touches the data in use, and a safe_set fails rather than evicting other data.
  local gen = (DICT:get("gen:" .. key) or 0) + 1
  local ok, set_err = DICT:safe_set("blob:" .. key .. ":" .. gen, body)
  if not ok then return answer(507, "refused: shared dict: " .. tostring(set_err)) end
  DICT:set("gen:" .. key, gen)  -- a number: replaced in place
  DICT:set("held:epoch", epoch)
  DICT:set("held:version", data.version)
  -- Keep the previous generation (a worker may be reading it right now); forget older ones, and the
  -- data of skeletons that are neither this one nor the pushed one (old topologies).
  for _, k in ipairs(DICT:get_keys(0)) do
    local kfp, kgen = k:match("^blob:([^:]+):(%d+)$")
    if kfp == nil then kfp = k:match("^gen:([^:]+)$") end
    if kfp ~= nil and ((kfp ~= key and kfp ~= fp) or (kfp == key and kgen and tonumber(kgen) < gen - 1)) then
      DICT:delete(k)
    end
  end
  return answer(200, string.format("ok %d", data.version))
end

function M.version(fp)
  -- The version this worker routes with: the data it parsed (or parses now) for its skeleton.
  local data = current(fp)
  local held = data and string.format("%d %s", data.version, data.digest) or "none"
  local newest = string.format("%d %d", DICT:get("held:epoch") or 0, DICT:get("held:version") or 0)
  return answer(200, "skeleton " .. fp .. "\ndata " .. held .. "\nheld " .. newest)
end

return M
