-- wrk: GET select of one 1 KB scroll, each request as a random tenant of keys.txt.
local keys = {}
for line in io.lines(os.getenv("KEYS") or "keys.txt") do keys[#keys + 1] = line end
local path = "/api/v2/select?p=bench&c=1.1.1/1.1.1/1.1.500"
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
  return wrk.format("GET", path, { ["Authorization"] = "Bearer " .. keys[math.random(#keys)] })
end
