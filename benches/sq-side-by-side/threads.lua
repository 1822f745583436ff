-- Loaded by the wrk scripts beside it: gives each wrk thread its number (`id`, from 1) and seeds
-- that thread's random numbers with it. wrk runs a script in one Lua state per thread, and
-- LuaJIT's random numbers start from the same seed in each state unless seeded: unseeded, two
-- threads sent the same tenants, scrolls and bodies in the same order.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
function init(args)
  math.randomseed(id)
end
