-- A node leaves cleanly (it holds nothing any more): its presence, presence key, held
-- set and info go, and the sweeper lease if it holds it, so another node sweeps at its
-- next renewal.
-- KEYS[1] presence   KEYS[2] the node's presence key   KEYS[3] its held set
-- KEYS[4] the info hash   KEYS[5] the sweeper lease   ARGV[1] the node's id
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HDEL', KEYS[4], ARGV[1])
if redis.call('GET', KEYS[5]) == ARGV[1] then redis.call('DEL', KEYS[5]) end
return 1
