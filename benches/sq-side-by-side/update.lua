-- wrk: POST update of a random scroll (of 999) with 1,000 new bytes, each request as a random tenant.
-- Every body is new (this thread's number, a random number and this thread's count, then
-- padding): an update that wrote what the scroll already held would change nothing, and
-- sq-cloud answers such a write without logging, syncing or replicating a record.
local keys = {}
for line in io.lines(os.getenv("KEYS") or "keys.txt") do keys[#keys + 1] = line end
local pad = string.rep("x", 977)
local sent = 0
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "threads.lua")
request = function()
  sent = sent + 1
  local body = string.format("%03d%010d%010d", id, math.random(0, 999999999), sent) .. pad
  local path = "/api/v2/update?p=bench&c=1.1.1/1.1.1/1.1." .. math.random(999)
  return wrk.format("POST", path, { ["Authorization"] = "Bearer " .. keys[math.random(#keys)] }, body)
end
