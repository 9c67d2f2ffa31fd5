-- Take a dedup key for a task unless another (live) task holds it.
-- KEYS[1] dedup key
-- ARGV[1] task id   ARGV[2] TTL (ms)   ARGV[3] a holder found done, or ''
-- Returns false (nil) when ARGV[1] holds the key after the call, else the holder.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] and (ARGV[3] == '' or holder ~= ARGV[3]) then
  return holder
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
