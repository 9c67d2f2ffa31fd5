-- A pool child is about to run a delivery: mark it started, unless its node handed the
-- message back at warm shutdown (restore.lua with a marker) and another copy runs it.
-- KEYS[1] the delivery's start marker   ARGV[1] the 'run' marker's TTL (ms)
-- Returns 1 (run it), or 0 (handed back: do not run it).
if redis.call('SET', KEYS[1], 'run', 'NX', 'PX', ARGV[1]) then return 1 end
if redis.call('GET', KEYS[1]) == 'back' then return 0 end
redis.call('SET', KEYS[1], 'run', 'PX', ARGV[1])
return 1
