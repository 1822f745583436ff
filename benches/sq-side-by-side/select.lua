-- wrk: GET select of one 1 KB scroll, each request as a random tenant of keys.txt.
local keys = {}
for line in io.lines(os.getenv("KEYS") or "keys.txt") do keys[#keys + 1] = line end
local path = "/api/v2/select?p=bench&c=1.1.1/1.1.1/1.1.500"
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "threads.lua")
request = function()
  return wrk.format("GET", path, { ["Authorization"] = "Bearer " .. keys[math.random(#keys)] })
end
