-- Keep every message a node holds from reaching kombu's visibility timeout, and forget
-- the ones it no longer holds, on the server's clock.
-- KEYS[1] kombu's unacked_index (sorted set: delivery tag -> delivery time, s)
-- KEYS[2] the node's held set (delivery tags)
-- ARGV[1] age (s) to give each held message (half the visibility timeout)
-- Returns how many messages the node still holds. A tag no longer in the index (acked,
-- or restored) leaves the held set; ZADD XX never brings an entry back. Three commands
-- per 1,000 tags (ZMSCORE, ZADD, SREM); one ZSCORE per tag where the server has no
-- ZMSCORE (Redis < 6.2).
local age = tonumber(ARGV[1])
if not age or age < 0 then return redis.error_reply('ERR age must be >= 0 s') end
local t = redis.call('TIME')
local score = tonumber(t[1]) + tonumber(t[2]) / 1000000 - age
local tags = redis.call('SMEMBERS', KEYS[2])
local held = 0
local BATCH = 1000  -- well under Lua's unpack limit (8,000 values)
for first = 1, #tags, BATCH do
    local chunk = {unpack(tags, first, math.min(first + BATCH - 1, #tags))}
    local scores = redis.pcall('ZMSCORE', KEYS[1], unpack(chunk))
    if type(scores) == 'table' and scores['err'] then
        scores = {}
        for i = 1, #chunk do scores[i] = redis.call('ZSCORE', KEYS[1], chunk[i]) end
    end
    local kept, gone = {}, {}
    for i = 1, #chunk do
        if scores[i] then
            kept[#kept + 1] = score
            kept[#kept + 1] = chunk[i]
        else
            gone[#gone + 1] = chunk[i]
        end
    end
    if #kept > 0 then redis.call('ZADD', KEYS[1], 'XX', unpack(kept)) end
    if #gone > 0 then redis.call('SREM', KEYS[2], unpack(gone)) end
    held = held + #kept / 2
end
return held
