-- wrk script for docs/BENCHMARKS.md: select random scrolls of the bench document.
-- Usage: wrk -t2 -c16 -d10s -s docs/wrk-select.lua URL -- KEY [PHEXT] [SCROLLS]
local key, phext, scrolls
function init(args)
  key = args[1]
  phext = args[2] or "bench"
  scrolls = tonumber(args[3] or "1000")
  math.randomseed(os.time() + (tonumber(tostring({}):sub(8), 16) or 0))
end
function request()
  local i = math.random(0, scrolls - 1)
  local path = string.format("/api/v2/select?p=%s&c=1.1.1/1.1.1/1.%d.%d", phext, math.floor(i / 100) + 1, i % 100 + 1)
  return wrk.format("GET", path, { ["Authorization"] = "Bearer " .. key })
end
