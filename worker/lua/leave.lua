-- Remove this consumer from the group, but only if it owns no pending entry: deleting a consumer drops its
-- pending entries, and those requests would never be recovered.
--
-- KEYS: 1 control stream
-- ARGV: 1 group   2 consumer
-- Returns 1 if the consumer was removed.

if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
