-- End a delivery: record the completion when the body succeeded, reset the crash count,
-- and delete the run lease, start mark and lock lease that are still the owner's.
-- KEYS[1] completion record   KEYS[2] run lease   KEYS[3] start mark   KEYS[4] crash count
-- KEYS[5] lock lease (only for a task with a lock)
-- ARGV[1] owner   ARGV[2] '1' when the body succeeded   ARGV[3] record ttl (ms)
-- ARGV[4] publish id (the record's value; '1' when empty)
-- Returns 1 when this call released the lock lease, else 0.
if ARGV[2] == '1' then
  local record = ARGV[4]
  if record == '' then record = '1' end
  redis.call('SET', KEYS[1], record, 'PX', ARGV[3])
end
redis.call('DEL', KEYS[4])
for i = 2, 3 do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]) end
end
if #KEYS >= 5 and redis.call('GET', KEYS[5]) == ARGV[1] then
  redis.call('DEL', KEYS[5])
  return 1
end
return 0
