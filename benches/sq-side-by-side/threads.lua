-- Loaded by the wrk scripts beside it: gives each wrk thread its number (`id`, from 1) and seeds
-- that thread's random numbers with it and with the time the run started. wrk runs a script in
-- one Lua state per thread, and LuaJIT's random numbers start from the same seed in each state
-- unless seeded: unseeded, two threads sent the same tenants, scrolls and bodies in the same
-- order. Seeded with the thread's number alone, each run repeated the run before it, so a
-- second run's updates wrote what the first had written and changed nothing.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
  thread:set("started", os.time())
end
function init(args)
  math.randomseed(started * 1000 + id)
end
