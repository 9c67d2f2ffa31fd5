-- Take up to ARGV[4] messages of a node whose presence expired, to restore them.
-- KEYS[1] presence (sorted set: id -> deadline, ms)   KEYS[2] the dead node's held set
-- KEYS[3] the claimer's held set   KEYS[4] kombu's unacked hash
-- KEYS[5] the recovery lease of the dead node   KEYS[6] the info hash
-- ARGV[1] dead node id   ARGV[2] claimer id   ARGV[3] recovery lease ttl (ms)
-- ARGV[4] batch size
-- Returns {state, tag1, entry1, tag2, entry2, ...}: state 0 when the node is alive (it
-- renewed) or another node recovers it, 1 when more messages remain, 2 when this call
-- took the last ones and removed the node. Each tag moves from the dead node's held set
-- to the claimer's in this one step: a claimer that dies before it restored them is a
-- dead node in turn, and no two claimers ever take the same message.
local ttl, batch = tonumber(ARGV[3]), tonumber(ARGV[4])
if not ttl or ttl <= 0 or not batch or batch <= 0 then
    return redis.error_reply('ERR ttl and batch must be > 0')
end
local now = now_ms()
local deadline = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '')
if not deadline or deadline >= now then return {0} end
local recoverer = redis.call('GET', KEYS[5])
if recoverer and recoverer ~= ARGV[2] then return {0} end
redis.call('SET', KEYS[5], ARGV[2], 'PX', ttl)
local out = {1}
local tags = redis.call('SPOP', KEYS[2], batch)
for i = 1, #tags do
    local entry = redis.call('HGET', KEYS[4], tags[i])
    if entry then
        redis.call('SADD', KEYS[3], tags[i])
        out[#out + 1] = tags[i]
        out[#out + 1] = entry
    end
end
if redis.call('SCARD', KEYS[2]) == 0 then
    redis.call('ZREM', KEYS[1], ARGV[1])
    redis.call('DEL', KEYS[5])
    redis.call('HDEL', KEYS[6], ARGV[1])
    out[1] = 2
end
return out
