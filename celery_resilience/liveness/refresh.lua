-- Keep every message a node holds from reaching kombu's visibility timeout, and forget
-- the ones it no longer holds, on the server's clock.
-- KEYS[1] kombu's unacked_index (sorted set: delivery tag -> delivery time, s)
-- KEYS[2] the node's held set (delivery tags)
-- ARGV[1] age (s) to give each held message (half the visibility timeout)
-- Returns how many messages the node still holds. A tag no longer in the index (acked,
-- or restored) leaves the held set; ZADD XX never brings an entry back.
local age = tonumber(ARGV[1])
if not age or age < 0 then return redis.error_reply('ERR age must be >= 0 s') end
local t = redis.call('TIME')
local score = tonumber(t[1]) + tonumber(t[2]) / 1000000 - age
local tags = redis.call('SMEMBERS', KEYS[2])
local held = 0
for i = 1, #tags do
    if redis.call('ZSCORE', KEYS[1], tags[i]) then
        redis.call('ZADD', KEYS[1], 'XX', score, tags[i])
        held = held + 1
    else
        redis.call('SREM', KEYS[2], tags[i])
    end
end
return held
