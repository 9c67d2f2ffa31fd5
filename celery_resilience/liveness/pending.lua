-- Whether a message that names a task id is in a Redis broker: queued or unacked.
-- KEYS[1] kombu's unacked hash   KEYS[2..] queue lists (each priority step's)
-- ARGV[1] what to look for (the task id, quoted as in the message's JSON)
-- ARGV[2] most messages to read
-- Returns 1 found, 0 not there, -1 more messages than ARGV[2] (none read).
-- Reads only: one script, so a fetch or a restore (also scripts) cannot move the
-- message between the places it looks in.
local function count(key, kind)
  local t = redis.call('TYPE', key)['ok']
  if t ~= kind then return 0 end
  if kind == 'hash' then return redis.call('HLEN', key) end
  return redis.call('LLEN', key)
end
local total = count(KEYS[1], 'hash')
for i = 2, #KEYS do total = total + count(KEYS[i], 'list') end
if total > tonumber(ARGV[2]) then return -1 end
local needle = ARGV[1]
if count(KEYS[1], 'hash') > 0 then
  for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
    if string.find(v, needle, 1, true) then return 1 end
  end
end
for i = 2, #KEYS do
  if count(KEYS[i], 'list') > 0 then
    for _, v in ipairs(redis.call('LRANGE', KEYS[i], 0, -1)) do
      if string.find(v, needle, 1, true) then return 1 end
    end
  end
end
return 0
