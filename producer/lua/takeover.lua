-- Take over up to N calls of a call runner whose lease expired, counting one more re-run for each.
--
-- One script, so two live runners can never both take one call: the expiry is checked, and each call moved
-- from the lost runner's hash to the taker's, in the same step. The lost runner's lease goes once it holds
-- nothing more, so a later pass takes what did not fit now.
--
-- KEYS (tag {runners}): 1 leases   2 the lost runner's calls (hash)   3 the taker's calls (hash)
-- ARGV: 1 lost runner's name   2 taker's name   3 the most calls to take
-- Returns {request id, re-runs so far (this one included), ...}; empty when the lease is not expired (it was
-- renewed, or another runner took it), or when the taker's own lease has run out.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lost = redis.call('ZSCORE', KEYS[1], ARGV[1])
local mine = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not lost or tonumber(lost) > now or not mine or tonumber(mine) < now then
  return {}
end
local held = redis.call('HGETALL', KEYS[2])
local taken = {}
local limit = tonumber(ARGV[3])
for i = 1, #held, 2 do
  if #taken >= 2 * limit then
    break
  end
  local reruns = tonumber(held[i + 1]) + 1
  redis.call('HDEL', KEYS[2], held[i])
  redis.call('HSET', KEYS[3], held[i], reruns)
  taken[#taken + 1] = held[i]
  taken[#taken + 1] = tostring(reruns)
end
if redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return taken
