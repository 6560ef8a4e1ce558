-- Join, or renew, a call runner's lease: its expiry on Redis's own clock, so runners on hosts whose clocks
-- differ still agree on who is overdue.
--
-- KEYS (tag {runners}): 1 leases (sorted set: runner name -> expiry, ms)
-- ARGV: 1 runner name   2 lease length (ms)   3 'join' or 'renew'
-- Returns the new expiry (ms), or -1 when renewing a lease that is gone: a peer took this runner's calls
-- over (it was silent too long), so it must drop them and never write for them again.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == 'renew' and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return -1
end
local expiry = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
return expiry
