-- Admit one delivery of a task: check its completion record, run lease, crash count
-- and lock, then take the run lease (and the lock) for it.
-- KEYS[1] completion record   KEYS[2] run lease   KEYS[3] start mark   KEYS[4] crash count
-- KEYS[5] lock lease, KEYS[6] fencing counter (both only for a task with a lock)
-- ARGV[1] owner   ARGV[2] publish id   ARGV[3] lease ttl (ms)   ARGV[4] max crashes
-- ARGV[5] record ttl (ms)   ARGV[6..] adoptable owners
-- Returns {status, crashes, fencing token, lease ms left, holder, 1 if a lost
-- predecessor was counted}; status 0 admitted, 1 duplicate, 2 crash budget spent,
-- 3 lock contended, 4 running elsewhere.
-- Reads everything before its first write (Redis does not roll a script back).

-- Whether lease/mark value `v` is this delivery's own (ARGV[1]) or an adoptable
-- owner's (ARGV[6..]).
local function own(v)
  if not v then return false end
  for i = 6, #ARGV do
    if v == ARGV[i] then return true end
  end
  return v == ARGV[1]
end

local done = redis.call('GET', KEYS[1])
if done and (done == ARGV[2] or done == '1' or ARGV[2] == '') then
  return {1, 0, 0, 0, false, 0}
end
local run = redis.call('GET', KEYS[2])
if run and not own(run) then
  return {4, 0, 0, redis.call('PTTL', KEYS[2]), run, 0}
end
local crashes = tonumber(redis.call('GET', KEYS[4]) or '0') or 0
local started = redis.call('GET', KEYS[3])
local holder = false
if #KEYS >= 5 then holder = redis.call('GET', KEYS[5]) end
local lost = 0
if started and not own(started) and not run then
  lost = 1
  crashes = crashes + 1
  redis.call('SET', KEYS[4], crashes, 'PX', ARGV[5])
  redis.call('DEL', KEYS[3])
  started = false
end
if crashes >= tonumber(ARGV[4]) then
  return {2, crashes, 0, 0, false, lost}
end
if holder and not own(holder) then
  if run then redis.call('DEL', KEYS[2]) end
  if started then redis.call('DEL', KEYS[3]) end
  return {3, crashes, 0, redis.call('PTTL', KEYS[5]), holder, lost}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[5])
if #KEYS < 5 then
  return {0, crashes, 0, 0, false, lost}
end
redis.call('SET', KEYS[5], ARGV[1], 'PX', ARGV[3])
-- token = max(previous + 1, server time in microseconds): increasing even after
-- the counter of a key idle for the record ttl expired.
local now = redis.call('TIME')
local token = math.max(tonumber(redis.call('GET', KEYS[6]) or '0') + 1,
                       tonumber(now[1]) * 1000000 + tonumber(now[2]))
redis.call('SET', KEYS[6], string.format('%.0f', token), 'PX', ARGV[5])
return {0, crashes, token, 0, false, lost}
