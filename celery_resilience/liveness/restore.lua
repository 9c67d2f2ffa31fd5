-- Put claimed messages back on their queues, each at most once.
-- KEYS[1] kombu's unacked hash   KEYS[2] kombu's unacked_index   KEYS[3] the claimer's held set
-- KEYS[4..] the queue lists the messages go to
-- ARGV: for each message: delivery tag, payload (JSON), n, then n indexes into KEYS
-- Returns one flag per message: 1 restored, 0 already gone (acked, or restored by
-- kombu's own sweep meanwhile). RPUSH: kombu pops from the right, so a restored
-- message is the next one fetched, as kombu's own restore does.
local messages, i = {}, 1
while i <= #ARGV do
    local n = tonumber(ARGV[i + 2])
    if not n or n < 1 then return redis.error_reply('ERR malformed restore arguments') end
    local targets = {}
    for j = 1, n do
        local k = tonumber(ARGV[i + 2 + j])
        if not k or not KEYS[k] or k < 4 then
            return redis.error_reply('ERR restore target out of range')
        end
        targets[j] = KEYS[k]
    end
    messages[#messages + 1] = {ARGV[i], ARGV[i + 1], targets}
    i = i + 3 + n
end
local out = {}
for m = 1, #messages do
    local tag, payload, targets = messages[m][1], messages[m][2], messages[m][3]
    redis.call('SREM', KEYS[3], tag)
    if redis.call('HDEL', KEYS[1], tag) == 1 then
        redis.call('ZREM', KEYS[2], tag)
        for j = 1, #targets do redis.call('RPUSH', targets[j], payload) end
        out[m] = 1
    else
        out[m] = 0
    end
end
return out
