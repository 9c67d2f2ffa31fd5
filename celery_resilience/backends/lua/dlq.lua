-- The dead-letter queue's writes: store, delete and purge. They are one script so
-- that all three share drop() below; the last ARGV names the command, and the
-- arguments before it are the command's own:
--
-- store   ARGV[1] prefix   ARGV[2] id   ARGV[3] entry JSON   ARGV[4] score (us)
--         ARGV[5] task name   ARGV[6] reason   ARGV[7] retention cutoff (us)
--         ARGV[8] max entries per task name
--         Returns {trimmed, expired}, or an error (before any write) when a key it
--         writes holds another type.
-- delete  ARGV[1] prefix   ARGV[2] id
--         Returns 1 if anything of the entry was there (and is gone), else 0.
-- purge   ARGV[1] prefix   ARGV[2] index key   ARGV[3] batch size
--         Removes up to a batch of the index's entries; returns how many it removed
--         (call again until 0).
--
-- KEYS: none. Every key derives from the prefix (ARGV[1]) and from what the script
-- reads (the ids in an index, the task names in {prefix}:dlq:tasks), so a Redis
-- Cluster port must hash-tag the prefix.
--
-- Redis keeps the writes of a script that fails halfway, so nothing here can fail
-- on what it reads: reads check the key's type first (a key of another type holds
-- none of ours), and a write goes only to a key of the type it needs.

-- celery_resilience.deadletter.GIVE_UP_REASONS (redis_dlq.py checks they agree)
local REASONS = {'max_retries', 'error', 'worker_lost', 'lock_contended'}

local function kind(key) return redis.call('TYPE', key)['ok'] end
local function zrem(key, id)
  if kind(key) == 'zset' then return redis.call('ZREM', key, id) end
  return 0
end
local function split(meta)
  if type(meta) ~= 'string' then return nil end
  local cut = string.find(meta, '\31', 1, true)
  if not cut or cut == 1 or cut == #meta then return nil end
  return string.sub(meta, 1, cut - 1), string.sub(meta, cut + 1)
end
-- Where entry `id` may be indexed. `{prefix}:dlq:meta` maps id -> "task name \31
-- reason"; when that value is missing or corrupt, the entry is looked for under the
-- task name and reason its JSON names, every task name in `{prefix}:dlq:tasks` and
-- every give-up reason.
local function places(prefix, id, meta)
  local task, reason = split(meta)
  if task then return {[task] = true}, {[reason] = true} end
  local tasks, reasons = {}, {}
  for _, r in ipairs(REASONS) do reasons[r] = true end
  if kind(prefix .. ':dlq:tasks') == 'set' then
    for _, t in ipairs(redis.call('SMEMBERS', prefix .. ':dlq:tasks')) do tasks[t] = true end
  end
  local key = prefix .. ':dlq:e:' .. id
  if kind(key) == 'string' then
    local ok, doc = pcall(cjson.decode, redis.call('GET', key))
    if ok and type(doc) == 'table' then
      if type(doc.task_name) == 'string' then tasks[doc.task_name] = true end
      if type(doc.reason) == 'string' then reasons[doc.reason] = true end
    end
  end
  return tasks, reasons
end
-- Remove entry `id` from the store and from every index. Returns true if anything
-- of `id` was there.
local function drop(prefix, id)
  local metakey = prefix .. ':dlq:meta'
  local meta = false
  if kind(metakey) == 'hash' then meta = redis.call('HGET', metakey, id) end
  local tasks, reasons = places(prefix, id, meta)
  local found = meta ~= false
  if found then redis.call('HDEL', metakey, id) end
  if redis.call('DEL', prefix .. ':dlq:e:' .. id) == 1 then found = true end
  if zrem(prefix .. ':dlq:all', id) == 1 then found = true end
  for task in pairs(tasks) do
    zrem(prefix .. ':dlq:t:' .. task, id)
    for reason in pairs(reasons) do zrem(prefix .. ':dlq:tr:' .. task .. ':' .. reason, id) end
  end
  for reason in pairs(reasons) do zrem(prefix .. ':dlq:r:' .. reason, id) end
  return found
end

local function store()
  local p, id, score, task, reason = ARGV[1], ARGV[2], ARGV[4], ARGV[5], ARGV[6]
  local all, bytask = p .. ':dlq:all', p .. ':dlq:t:' .. task
  local need = {
    {p .. ':dlq:meta', 'hash'}, {all, 'zset'}, {bytask, 'zset'}, {p .. ':dlq:r:' .. reason, 'zset'},
    {p .. ':dlq:tr:' .. task .. ':' .. reason, 'zset'}, {p .. ':dlq:tasks', 'set'},
  }
  for _, want in ipairs(need) do
    local have = kind(want[1])
    if have ~= 'none' and have ~= want[2] then
      return redis.error_reply('key ' .. want[1] .. ' holds a ' .. have .. ', not a ' ..
        want[2] .. '; nothing was written')
    end
  end
  -- A counter that is not an integer is set afresh rather than failing INCRBY.
  local counter, counted = p .. ':dlq:trimmed:' .. task, false
  if kind(counter) == 'string' then
    local n = tonumber(redis.call('GET', counter))
    counted = n ~= nil and n == math.floor(n) and math.abs(n) < 2^53
  end
  redis.call('SET', p .. ':dlq:e:' .. id, ARGV[3])
  redis.call('HSET', p .. ':dlq:meta', id, task .. '\31' .. reason)
  redis.call('ZADD', all, score, id)
  redis.call('ZADD', bytask, score, id)
  redis.call('ZADD', p .. ':dlq:r:' .. reason, score, id)
  redis.call('ZADD', p .. ':dlq:tr:' .. task .. ':' .. reason, score, id)
  redis.call('SADD', p .. ':dlq:tasks', task)
  local expired = 0
  for _, old in ipairs(redis.call('ZRANGEBYSCORE', all, '-inf', ARGV[7], 'LIMIT', 0, 200)) do
    drop(p, old)
    expired = expired + 1
  end
  local trimmed = 0
  local excess = redis.call('ZCARD', bytask) - tonumber(ARGV[8])
  if excess > 0 then
    for _, old in ipairs(redis.call('ZRANGE', bytask, 0, excess - 1)) do
      drop(p, old)
      redis.call('ZREM', bytask, old)
      trimmed = trimmed + 1
    end
    if counted then
      redis.call('INCRBY', counter, trimmed)
    else
      redis.call('SET', counter, trimmed)
    end
  end
  return {trimmed, expired}
end

local function delete()
  if drop(ARGV[1], ARGV[2]) then return 1 end
  return 0
end

local function purge()
  if kind(ARGV[2]) ~= 'zset' then return 0 end
  local n = 0
  for _, id in ipairs(redis.call('ZRANGE', ARGV[2], 0, tonumber(ARGV[3]) - 1)) do
    drop(ARGV[1], id)
    redis.call('ZREM', ARGV[2], id)
    n = n + 1
  end
  return n
end

local command = ({store = store, delete = delete, purge = purge})[ARGV[#ARGV]]
if not command then return redis.error_reply('ERR unknown DLQ command') end
return command()
