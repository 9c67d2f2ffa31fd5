-- Compare-and-delete: delete each key of KEYS whose value is ARGV[1].
-- For a delivery's leases: KEYS[1] run lease, KEYS[2] lock lease (a task with a
-- lock), ARGV[1] owner. For a dedup key: KEYS[1] the key, ARGV[1] the task id.
-- Returns 1 if any of them held ARGV[1] and was deleted, else 0.
local released = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    released = 1
  end
end
return released
