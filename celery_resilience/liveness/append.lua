-- Record a message fetched with kombu's BRPOP as unacked and held by this node, on the
-- server's clock (kombu's own QoS.append scores it with the worker's clock).
-- KEYS[1] kombu's unacked hash   KEYS[2] kombu's unacked_index   KEYS[3] the node's held set
-- ARGV[1] delivery tag   ARGV[2] the unacked entry ([payload, exchange, routing key], JSON)
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
