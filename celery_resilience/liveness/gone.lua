-- Whether a presence lease is provably gone, on the server's clock.
-- KEYS[1] presence (sorted set: id -> deadline, ms)   KEYS[2] clock (ms of the last sweep)
-- ARGV[1] id   ARGV[2] ttl (ms): a last sweep older than a third of it proves nothing
-- Returns 1 when the id's lease expired (or was swept) while nodes were sweeping, else 0.
-- Without a recent sweep (the server just came back, or no node sweeps) nobody could
-- renew meanwhile: 0, the lease is not presumed gone.
local ttl = tonumber(ARGV[2])
if not ttl or ttl <= 0 then return redis.error_reply('ERR ttl must be > 0 ms') end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('GET', KEYS[2]) or '')
if not last or now - last > ttl / 3 then return 0 end
local deadline = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '')
if deadline and deadline >= now then return 0 end
return 1
