-- Put claimed messages back on their queues, each at most once.
-- KEYS[1] kombu's unacked hash   KEYS[2] kombu's unacked_index   KEYS[3] the claimer's held set
-- KEYS[4..] the queue lists the messages go to, and the start markers of handed-back ones
-- ARGV: for each message: delivery tag, payload (JSON), g, n, then n indexes into KEYS;
-- g is 0, or (a hand-back) the index into KEYS of the message's start marker
-- (start.lua): a message whose pool child marked it started is not put back; one put
-- back gets the marker 'back' for ARGV[1] ms, so that its child does not run it.
-- ARGV[1] the 'back' marker's TTL (ms); the messages follow from ARGV[2].
-- Returns one flag per message: 1 restored, 0 already gone (acked, or restored by
-- kombu's own sweep meanwhile) or started. RPUSH: kombu pops from the right, so a
-- restored message is the next one fetched, as kombu's own restore does.
local messages, i, back = {}, 2, tonumber(ARGV[1])
if not back or back < 1 then return redis.error_reply('ERR malformed restore arguments') end
while i <= #ARGV do
    local g, n = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
    if not g or not n or n < 1 or (g ~= 0 and (g < 4 or not KEYS[g])) then
        return redis.error_reply('ERR malformed restore arguments')
    end
    local targets = {}
    for j = 1, n do
        local k = tonumber(ARGV[i + 3 + j])
        if not k or not KEYS[k] or k < 4 then
            return redis.error_reply('ERR restore target out of range')
        end
        targets[j] = KEYS[k]
    end
    messages[#messages + 1] = {ARGV[i], ARGV[i + 1], g, targets}
    i = i + 4 + n
end
local out = {}
for m = 1, #messages do
    local tag, payload, g, targets = unpack(messages[m])
    if g ~= 0 and redis.call('SET', KEYS[g], 'back', 'NX', 'PX', back) == false then
        out[m] = 0
    else
        redis.call('SREM', KEYS[3], tag)
        if redis.call('HDEL', KEYS[1], tag) == 1 then
            redis.call('ZREM', KEYS[2], tag)
            for j = 1, #targets do redis.call('RPUSH', targets[j], payload) end
            out[m] = 1
        else
            if g ~= 0 then redis.call('DEL', KEYS[g]) end
            out[m] = 0
        end
    end
end
return out
