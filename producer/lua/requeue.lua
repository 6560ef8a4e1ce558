-- Put a job stranded in rq's intermediate queue back at the front of its queue.
--
-- rq's dequeue moves a job from the queue to the intermediate queue; the runner that moved it then marks it
-- started, taking it out of the intermediate queue in the same transaction. A runner killed between the two
-- leaves the job there, run by no one. One script, so that of two live runners putting it back, or a runner
-- marking it started meanwhile, exactly one removes it: the job is queued once or not at all.
--
-- KEYS (rq's, untagged): 1 the intermediate queue   2 the queue
-- ARGV: 1 job id
-- Returns 1 when the job was put back, 0 when it had left the intermediate queue already.

if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
