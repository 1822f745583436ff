-- wrk: POST update of a random scroll (of 999) with 1,000 new bytes, each request as a random tenant.
local keys = {}
for line in io.lines(os.getenv("KEYS") or "keys.txt") do keys[#keys + 1] = line end
local body = string.rep("x", 1000)
request = function()
  local path = "/api/v2/update?p=bench&c=1.1.1/1.1.1/1.1." .. math.random(999)
  return wrk.format("POST", path, { ["Authorization"] = "Bearer " .. keys[math.random(#keys)] }, body)
end
