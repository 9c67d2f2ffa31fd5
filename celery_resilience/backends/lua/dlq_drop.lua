-- Drop dead letters: each one's meta field, document and index rows, in one call.
--
-- KEYS[1] meta hash ({base}:meta), then one block of keys per entry, in ARGV's order:
--         the entry ({base}:e:{id}) first, then every index sorted set it may be in,
--         and last, when it counts as trimmed, its task name's trimmed counter
--         ({base}:trimmed:{task}).
-- ARGV    five per entry: its id; what the client read of its meta field ('1' a value,
--         '0' none, '*' check nothing); the value read ('' when none); the number of
--         keys in its block; '1' when it counts as trimmed (its block ends with the
--         counter), else '0'.
--
-- An entry whose meta field is no longer what the client read (a store or delete ran
-- in between) is skipped, so that the client can read it again. Otherwise its meta
-- field and document are deleted and its id is removed from each sorted set of its
-- block (a key of another type is left alone); a trimmed entry of which something was
-- removed adds 1 to the counter (a counter that is not an integer is set to 1).
-- Returns one number per entry: 1 something of it was removed, 0 nothing of it was
-- there, -1 skipped.
--
-- Every key is in KEYS: a helper takes a KEYS index, never a key name. Redis keeps
-- the writes of a script that fails halfway, so nothing here fails on what it reads.

local function kind(i) return redis.call('TYPE', KEYS[i])['ok'] end

local function count(i) -- add 1 to the counter KEYS[i]
  local n = kind(i) == 'string' and redis.call('GET', KEYS[i])
  -- What INCRBY accepts: a signed 64-bit integer without a leading zero or sign.
  if n and #n < 19 and (n == '0' or string.match(n, '^%-?[1-9]%d*$')) then
    redis.call('INCRBY', KEYS[i], 1)
  else
    redis.call('SET', KEYS[i], 1)
  end
end

local hashed = kind(1) == 'hash'
local results, first = {}, 2
for a = 1, #ARGV, 5 do
  local id, read, value = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local last, counted = first + tonumber(ARGV[a + 3]) - 1, ARGV[a + 4] == '1'
  local now = hashed and redis.call('HGET', KEYS[1], id)
  local result = -1
  if read == '*' or (read == '0' and not now) or (read == '1' and now == value) then
    result = 0
    if now then result = redis.call('HDEL', KEYS[1], id) end
    if redis.call('DEL', KEYS[first]) == 1 then result = 1 end
    local zsets = counted and last - 1 or last
    for i = first + 1, zsets do
      if kind(i) == 'zset' and redis.call('ZREM', KEYS[i], id) == 1 then result = 1 end
    end
    if counted and result == 1 then count(last) end
  end
  results[#results + 1] = result
  first = last + 1
end
return results
