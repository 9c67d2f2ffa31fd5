-- Give up the leases of a delivery that the owner still holds.
-- KEYS[1] run lease   KEYS[2] lock lease (only for a task with a lock)
-- ARGV[1] owner
-- Returns 1 if any of them was the owner's and was deleted, else 0.
local released = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    released = 1
  end
end
return released
