-- Refresh, or hand back, this consumer's claims on control entries - only those it still owns.
--
-- A plain `XCLAIM ... JUSTID` to oneself would also take back an entry that a peer recovered while this
-- worker was stalled, and two workers would then assemble the same request. So each entry is checked
-- first: XPENDING filtered by this consumer tells whether it is still ours.
--
-- KEYS: 1 control stream
-- ARGV: 1 group   2 consumer   3 idle time to set, ms (0 refreshes the claim; the claim timeout hands it
--       back, so that a peer's XAUTOCLAIM takes it at once)   4.. entry ids
-- Returns the entry ids this consumer still owns.

local owned = {}
for i = 4, #ARGV do
  local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #mine > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    owned[#owned + 1] = ARGV[i]
  end
end
return owned
