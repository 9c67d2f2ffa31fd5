-- Renew each lease of a delivery that the owner holds.
-- KEYS[1] run lease   KEYS[2] lock lease (only for a task with a lock)
-- ARGV[1] owner   ARGV[2] lease ttl (ms)
-- Returns 1 if the owner held all of them, 0 if one was lost.
local held = 1
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  else
    held = 0
  end
end
return held
