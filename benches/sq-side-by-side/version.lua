-- wrk: GET /api/v2/version with a key. sq-cloud's gateway answers it alone (no QUIC hop, no
-- node), so beside select it shows what the hop to the node costs.
local keys = {}
for line in io.lines(os.getenv("KEYS") or "keys.txt") do keys[#keys + 1] = line end
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "threads.lua")
request = function()
  return wrk.format("GET", "/api/v2/version", { ["Authorization"] = "Bearer " .. keys[math.random(#keys)] })
end
