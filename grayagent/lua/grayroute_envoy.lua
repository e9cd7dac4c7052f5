-- grayroute_envoy: the Envoy Lua filter adapter. The renderer (grayagent/targets/envoy_render.py)
-- prepends `local grayroute = <grayroute_core.lua>` and `local PREFIX, SERVICES = <config>` (and LISTS,
-- name -> ID set, when a rule tests a list).
--
-- Per request it publishes, for the Envoy route entries to match on (all names under PREFIX, whose
-- client-sent copies the listener's early header mutation has already removed):
--   <PREFIX>in-<i>     the value of the service's i-th input field, only when non-empty (empty = absent);
--   <PREFIX>cidr-<i>   "1" when the direct peer is in the service's i-th sourceCIDRs list;
--   <PREFIX>list-<j>   "1" when the j-th (input, ID list) pair holds: the input's value is in the list;
--   <PREFIX>split      the split's upstream (or the default one), set LAST: every rule and split route
--                      requires it, so a script that fails half-way falls through to the default route.
-- The route entry selected before this runs (the catch-all) names the service in its metadata.

local function joined_cookie(headers)
  -- nginx 1.22 joins repeated Cookie headers with "; " into $http_cookie.
  local n = headers:getNumValues("cookie")
  if n == 0 then return "" end
  if n == 1 then return headers:getAtIndex("cookie", 0) or "" end
  local parts = {}
  for i = 0, n - 1 do parts[#parts + 1] = headers:getAtIndex("cookie", i) or "" end
  return table.concat(parts, "; ")
end

local function first_value(headers, name, req)
  -- Envoy keeps each occurrence of a custom header; the first one counts (nginx's $http_NAME).
  if name == "host" then name = ":authority" end
  if name == "cookie" then
    if req.cookie == nil then req.cookie = joined_cookie(headers) end
    return req.cookie
  end
  return headers:getAtIndex(name, 0) or ""
end

local function field_value(headers, field, req)
  local kind = field[1]
  if kind == "header" then return first_value(headers, field[2], req) end
  if kind == "path" then return req.path end
  if kind == "cookie" then
    if req.cookie == nil then req.cookie = joined_cookie(headers) end
    return grayroute.cookie_value(req.cookie, field[2])
  end
  return grayroute.query_value(req.query, field[2])
end

-- Anonymous visitors (whenKeyMissing: cookie): the split on the visitor's ID, or on a fresh one, which the
-- response then sets (dynamic metadata carries it across). Envoy makes no random request ID here (the
-- listener has generate_request_id off, and a client could send its own), so the core reads /dev/urandom.
local META = "grayagent"

local function anonymous_visitor(handle, headers, split, req)
  local upstream, _, fresh = grayroute.anon_split(split, field_value(headers, {"cookie", split.anon.name}, req),
                                                  grayroute.new_anon_id)
  if fresh ~= nil then
    handle:streamInfo():dynamicMetadata():set(META, "set-cookie", grayroute.set_cookie(split.anon, fresh))
  end
  return upstream
end

function envoy_on_request(handle)
  local meta = handle:metadata()
  local svc = SERVICES[meta:get("service") or ""]
  if svc == nil then return end
  local headers = handle:headers()
  local req = {}
  req.path, req.query = grayroute.split_target(headers:get(":path") or "")

  -- Read every value before writing any header.
  local values = {}
  for i, field in ipairs(svc.inputs) do values[i] = field_value(headers, field, req) end
  local hits = {}
  if #svc.cidrs > 0 then
    local peer = grayroute.parse_peer(handle:streamInfo():downstreamDirectRemoteAddress())
    for i, list in ipairs(svc.cidrs) do hits[i] = grayroute.in_cidrs(list, peer) end
  end
  local in_list = {}
  if svc.lists ~= nil then
    -- {input index, list name} pairs: membership in a set built once per Lua state; "" is never an ID.
    for j, pair in ipairs(svc.lists) do in_list[j] = LISTS[pair[2]][values[pair[1]]] == true end
  end
  local upstream = svc.default
  if svc.split ~= nil then
    local key = ""
    if svc.split.key ~= nil then key = field_value(headers, svc.split.key, req) end
    if key == "" and svc.split.anon ~= nil then
      upstream = anonymous_visitor(handle, headers, svc.split, req)
    else
      upstream = grayroute.split_upstream(svc.split, key) or svc.default
    end
  end

  for i = 1, #values do
    if values[i] ~= "" then headers:replace(PREFIX .. "in-" .. i, values[i]) end
  end
  for i = 1, #hits do
    if hits[i] then headers:replace(PREFIX .. "cidr-" .. i, "1") end
  end
  for j = 1, #in_list do
    if in_list[j] then headers:replace(PREFIX .. "list-" .. j, "1") end
  end
  headers:replace(PREFIX .. "split", upstream)
  -- Select the route again, now on our headers.
  handle:clearRouteCache()
end

-- Only where some service has anonymous visitors: Envoy then runs this for every response of the listener.
local function any_anonymous()
  for _, svc in pairs(SERVICES) do
    if svc.split ~= nil and svc.split.anon ~= nil then return true end
  end
  return false
end

if any_anonymous() then
  -- The cookie goes out only when the split decided: a rule's route (<service>/rule/<name>) sends none,
  -- although the script, which runs before Envoy matches the rules, drew an ID for it.
  function envoy_on_response(handle)
    local meta = handle:streamInfo():dynamicMetadata():get(META)
    local cookie = meta and meta["set-cookie"]
    if cookie == nil then return end
    if string.find(handle:streamInfo():routeName() or "", "/rule/", 1, true) then return end
    handle:headers():add("set-cookie", cookie)
  end
end
