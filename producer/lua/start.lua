-- Open a request: claim its id for this producer, then write the start envelope and the control entry.
--
-- One script, so the check and the writes are one step: two producers starting the same request id at
-- once can never both pass the check, and a worker that sees the control entry always finds the start.
-- The owner key holds the token of the producer that started the request. Starting again with the same
-- token - a start retried after a lost reply, a re-run of the same job - writes the start again (workers
-- keep the first); another token is refused, so no request's chunks are ever mixed with another's.
--
-- KEYS (all carry the request's shard tag): 1 owner key   2 chunk stream   3 control stream
-- ARGV: 1 token   2 owner and stream max age (s)   3 n, the number of start-envelope arguments
--       4 .. 3+n the start envelope's fields and values   4+n .. the control entry's fields and values
-- Returns 1 for a new request, 2 for a start written again by its owner, 0 when another producer owns the id.

local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then
  return 0
end
local n = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4, 3 + n))
redis.call('EXPIRE', KEYS[2], ARGV[2], 'NX')
redis.call('XADD', KEYS[3], '*', unpack(ARGV, 4 + n))
if owner then
  return 2
end
return 1
