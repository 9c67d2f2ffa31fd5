-- Whether a presence lease is provably gone, on the server's clock.
-- KEYS[1] presence   KEYS[2] clock   ARGV[1] id   ARGV[2] ttl (ms) of the caller
-- Returns 1 when the id's lease expired (or was swept) while the server was serving,
-- else 0. After a quiet server (see clock.lua) the lease is not presumed gone.
local ttl = tonumber(ARGV[2])
if not ttl or ttl <= 0 then return redis.error_reply('ERR ttl must be > 0 ms') end
local now, quiet = served(KEYS[1], KEYS[2], ttl)
if quiet then return 0 end
local deadline = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '')
if deadline and deadline >= now then return 0 end
return 1
