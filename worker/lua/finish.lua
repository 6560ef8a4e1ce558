-- Finish one request: publish its result once, and release its input in every case.
--
-- One script, so Redis runs it as one step: a worker that dies or loses its connection part-way can never
-- leave a result without its usage event, an acknowledged request without a result, or a result published
-- twice. The done marker (SET NX) makes every later finisher of the same request - a peer that recovered
-- it, a retry after a lost reply - a no-op apart from acknowledging its own control entries. The marker
-- holds the producer token of the request's start: a later finisher with another token is a different
-- request that reused the id; it is dead-lettered, never published over the first one's result. The
-- publishing finish also appends a `final` entry to the chunk stream (if it is one): a follower reading
-- the stream wakes for it, and finds the result record already there.
--
-- KEYS (all carry the request's shard tag, so this runs in one slot of a cluster):
--   1 done marker   2 results stream   3 result key   4 usage stream   5 dead-letter stream
--   6 control stream   7 the request's chunk stream
-- ARGV:
--   1 group   2 result ttl (s)   3 chunk ttl (s)   4 request id   5 result record   6 usage event   7 status
--   8 notify channel (a channel, not a key)   9 dead-letter entry id ('' for none)   10 its reason
--   11 its raw payload   12 producer token ('' for none)   13 finish time (ms)
--   14.. the control entries to acknowledge
-- Returns 1 when this call published the result, 0 when an earlier finisher of the same request had, and
-- -1 when an earlier request with the same id had.

local reply = 1
if redis.call('SET', KEYS[1], ARGV[12], 'NX', 'EX', ARGV[2]) then
  redis.call('XADD', KEYS[2], '*', 'rid', ARGV[4], 'd', ARGV[5])
  redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[2])
  redis.call('XADD', KEYS[4], '*', 'rid', ARGV[4], 'd', ARGV[6])
  if ARGV[9] ~= '' then
    redis.call('XADD', KEYS[5], '*', 'rid', ARGV[4], 'entry', ARGV[9], 'reason', ARGV[10], 'd', ARGV[11])
  end
  redis.call('PUBLISH', ARGV[8], ARGV[7])
  if redis.call('TYPE', KEYS[7])['ok'] == 'stream' then
    redis.call('XADD', KEYS[7], '*', 'k', 'final', 'att', '0', 'ts', ARGV[13], 'd', ARGV[7])
  end
else
  reply = 0
  local owner = redis.call('GET', KEYS[1])
  if owner and owner ~= '' and ARGV[12] ~= '' and owner ~= ARGV[12] then
    reply = -1
    redis.call('XADD', KEYS[5], '*', 'rid', ARGV[4], 'entry', ARGV[14] or '', 'reason',
               'request id reused: a request of another producer with this id finished before; its result stands',
               'd', '')
  end
end
if #ARGV >= 14 then
  redis.call('XACK', KEYS[6], ARGV[1], unpack(ARGV, 14))
end
-- The chunks stay readable for followers of the request until they expire; never deleted here.
redis.call('EXPIRE', KEYS[7], ARGV[3])
return reply
