-- Renew a presence lease on the server's clock.
-- KEYS[1] presence   KEYS[2] clock
-- A node's only: KEYS[3] its presence key, set to ARGV[3] with the same TTL; KEYS[4] the
-- info hash, where ARGV[3] stays until the node leaves or is recovered; KEYS[5] the
-- sweeper lease, taken when free for ARGV[4] ms, or renewed when the node holds it.
-- ARGV[1] id   ARGV[2] ttl (ms)   ARGV[3] info (JSON)   ARGV[4] sweeper lease TTL (ms)
-- Returns {absent, sweeper}: absent is 1 if the id had no presence (first renewal, or
-- presumed dead and swept), sweeper 1 if the node holds the sweeper lease now.
local ttl = tonumber(ARGV[2])
if not ttl or ttl <= 0 then return redis.error_reply('ERR ttl must be > 0 ms') end
local now = served(KEYS[1], KEYS[2], ttl)
local absent = redis.call('ZADD', KEYS[1], 'GT', now + ttl, ARGV[1])
if not KEYS[3] then return {absent, 0} end
redis.call('SET', KEYS[3], ARGV[3], 'PX', ttl)
if absent == 1 then
    redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
end
if not sweeps(KEYS[5], ARGV[1], tonumber(ARGV[4])) then return {absent, 0} end
return {absent, 1}
