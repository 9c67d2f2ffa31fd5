-- Store one dead letter, and name the old entries that are now due to go (the client
-- drops them with dlq_drop.lua).
--
-- KEYS[1] the entry ({base}:e:{id})   KEYS[2] meta hash ({base}:meta)
-- KEYS[3] index of all entries ({base}:all)   KEYS[4] of its task name ({base}:t:{task})
-- KEYS[5] of its reason ({base}:r:{reason})   KEYS[6] of both ({base}:tr:{task}:{reason})
-- KEYS[7] set of task names ({base}:tasks)
-- ARGV[1] id   ARGV[2] entry JSON   ARGV[3] score (us)   ARGV[4] task name
-- ARGV[5] reason   ARGV[6] retention cutoff (us)   ARGV[7] max entries per task name
--
-- Returns an error, before any write, when KEYS[2..7] holds another type. Otherwise
-- writes the entry, its meta field (task name \31 reason) and its rows in KEYS[3..6],
-- and returns {expired, trimmed}, each a flat list id, meta, id, meta, ... where meta
-- is the id's meta value now (nil when it has none):
-- expired  the ids in KEYS[3] scored at most ARGV[6], oldest first, at most 200;
-- trimmed  the oldest ids in KEYS[4] past ARGV[7] once the expired ones are gone
--          (none of them expired).
--
-- Every key is in KEYS: a helper takes a KEYS index, never a key name.

local WANT = {[2] = 'hash', [3] = 'zset', [4] = 'zset', [5] = 'zset', [6] = 'zset', [7] = 'set'}
for i = 2, 7 do
  local have = redis.call('TYPE', KEYS[i])['ok']
  if have ~= 'none' and have ~= WANT[i] then
    return redis.error_reply('key ' .. KEYS[i] .. ' holds a ' .. have .. ', not a ' ..
      WANT[i] .. '; nothing was written')
  end
end

local id, task = ARGV[1], ARGV[4]
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], id, task .. '\31' .. ARGV[5])
for i = 3, 6 do redis.call('ZADD', KEYS[i], ARGV[3], id) end
redis.call('SADD', KEYS[7], task)

local function named(list, old) -- append old and its meta value
  list[#list + 1] = old
  list[#list + 1] = redis.call('HGET', KEYS[2], old)
end

local expired, gone, mine = {}, {}, 0
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[6], 'LIMIT', 0, 200)) do
  named(expired, old)
  gone[old] = true
  if redis.call('ZSCORE', KEYS[4], old) then mine = mine + 1 end
end
local trimmed = {}
local excess = redis.call('ZCARD', KEYS[4]) - mine - tonumber(ARGV[7])
if excess > 0 then
  -- The first excess + mine rows hold at least `excess` that did not expire.
  for _, old in ipairs(redis.call('ZRANGE', KEYS[4], 0, excess + mine - 1)) do
    if not gone[old] and #trimmed < 2 * excess then named(trimmed, old) end
  end
end
return {expired, trimmed}
