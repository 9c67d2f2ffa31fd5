-- The start of the scripts that judge presence (keys.py puts it there): the server's
-- clock, the check that the server was serving nodes all along, and the sweeper lease.
-- KEYS of the caller: presence (sorted set: id -> deadline, ms) and clock (ms of the
-- last renewal or sweep of any node or holder).

local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Record that the server serves liveness now (ttl: the caller's, ms). When no call came
-- for longer than half a TTL (the server was stopped or unreachable, or nobody ran),
-- nobody could renew meanwhile: every lease gets at least one TTL from now. Every node
-- renews every ttl / 3 and the sweeper sweeps every second, so a serving server hears
-- from them more often than that. Returns now (ms) and whether the server had been quiet.
local function served(presence, clock, ttl)
    local now = now_ms()
    local last = tonumber(redis.call('GET', clock) or '')
    redis.call('SET', clock, now)
    if last and now - last <= ttl / 2 then
        return now, false
    end
    local stale = redis.call('ZRANGEBYSCORE', presence, '-inf', '(' .. (now + ttl))
    for i = 1, #stale do
        redis.call('ZADD', presence, 'GT', now + ttl, stale[i])
    end
    return now, true
end

-- Take the sweeper lease (key lease) for id when it is free, or keep it when id holds
-- it, for ttl ms. Returns whether id holds it now.
local function sweeps(lease, id, ttl)
    local holder = redis.call('GET', lease)
    if holder and holder ~= id then
        return false
    end
    redis.call('SET', lease, id, 'PX', ttl)
    return true
end
