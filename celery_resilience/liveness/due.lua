-- Which presence leases have expired, on the server's clock; called by every live
-- node's sweep (every ttl / 6 at most), so it also keeps the time of the last sweep.
-- KEYS[1] presence (sorted set: id -> deadline, ms)   KEYS[2] clock (ms of the last sweep)
-- ARGV[1] ttl (ms) of the caller   ARGV[2] at most this many ids
-- Returns the expired ids, oldest deadline first. When no node swept for longer than
-- a third of a TTL (the server was stopped or unreachable, or no node ran), nobody
-- could renew meanwhile either: every lease gets at least one TTL from now, and none is
-- returned.
local ttl, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if not ttl or ttl <= 0 or not limit or limit <= 0 then
    return redis.error_reply('ERR ttl and limit must be > 0')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('GET', KEYS[2]) or '')
redis.call('SET', KEYS[2], now)
if not last or now - last > ttl / 3 then
    local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now + ttl))
    for i = 1, #stale do
        redis.call('ZADD', KEYS[1], 'GT', now + ttl, stale[i])
    end
    return {}
end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, limit)
