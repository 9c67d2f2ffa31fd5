-- The sweep: which presence leases have expired, on the server's clock. Only the node
-- holding the sweeper lease sweeps (one sweep a second for the whole fleet, not one per
-- node); renew.lua hands the lease to a node when it is free.
-- KEYS[1] presence   KEYS[2] clock   KEYS[3] the sweeper lease (the id holding it)
-- ARGV[1] ttl (ms) of the caller   ARGV[2] at most this many ids   ARGV[3] caller's id
-- ARGV[4] the sweeper lease's TTL (ms)
-- Returns {1, expired ids, oldest deadline first} while the caller holds the lease (its
-- TTL renewed), {0} once another node holds it. After a quiet server (see clock.lua)
-- no id is returned.
local ttl, limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
if not ttl or ttl <= 0 or not limit or limit <= 0 or not lease or lease <= 0 then
    return redis.error_reply('ERR ttl, limit and lease must be > 0')
end
if not sweeps(KEYS[3], ARGV[3], lease) then
    return {0}
end
local now, quiet = served(KEYS[1], KEYS[2], ttl)
if quiet then
    return {1}
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, limit)
table.insert(due, 1, 1)
return due
