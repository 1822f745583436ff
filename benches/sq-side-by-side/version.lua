-- wrk: GET /api/v2/version with a key. sq-cloud's gateway answers it alone (no QUIC hop, no
-- node), so beside select it shows what the hop to the node costs.
local keys = {}
for line in io.lines(os.getenv("KEYS") or "keys.txt") do keys[#keys + 1] = line end
-- Each wrk thread has its own Lua state, seeded here by its number: unseeded, every thread's
-- random numbers are the same sequence (update.lua).
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
function init(args)
  math.randomseed(id)
end
request = function()
  return wrk.format("GET", "/api/v2/version", { ["Authorization"] = "Bearer " .. keys[math.random(#keys)] })
end
