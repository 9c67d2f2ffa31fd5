-- Renew a presence lease on the server's clock.
-- KEYS[1] presence (sorted set: id -> deadline in ms of the server's clock)
-- KEYS[2], KEYS[3] (a node's only) its presence key, set to ARGV[3] with the same TTL,
-- and the info hash, where ARGV[3] stays until the node leaves or is recovered
-- ARGV[1] id   ARGV[2] ttl (ms)   ARGV[3] info (JSON; with KEYS[2] only)
-- Returns 1 if the id was absent (first renewal, or presumed dead and swept), else 0.
local ttl = tonumber(ARGV[2])
if not ttl or ttl <= 0 then return redis.error_reply('ERR ttl must be > 0 ms') end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local absent = redis.call('ZSCORE', KEYS[1], ARGV[1]) == false
redis.call('ZADD', KEYS[1], 'GT', now + ttl, ARGV[1])
if KEYS[2] then
    redis.call('SET', KEYS[2], ARGV[3], 'PX', ttl)
    redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
end
if absent then return 1 end
return 0
