"""The job queue's steps on Redis, as the Lua scripts Redis runs (Factor VI).

Factor VI puts every job in a backing service that all processes share. The terrible day
this module prevents: a job moved from the ready list to the running set by two separate
commands, with a worker killed in between (the job is in neither: lost), or two workers
reading the same ready job before either removes it (run twice at once). Redis runs a Lua
script whole while every other client waits, so each step of the queue here is one
script, as SQLite makes it one `BEGIN IMMEDIATE` transaction: no claim can see a job in
two places or in none. BullMQ and Sidekiq move their jobs the same way.

`job_queue.RedisJobQueue` runs these (through `Redis.eval`, by SHA1); this module only
holds them, as `job_queue.JOB_TABLE` holds SQLite's layout. The keys, all prefixed `job:`
or `jobs:` (sessions use `session:` and `upload:`):

    job:<id>             hash: task, args, state, attempts, max_attempts, worker, result,
                         error, key, private, lane, owner, token (the running claim's),
                         heartbeat, lease, run_at, times
    jobs:next_id         the last id given out (INCR: ids count up; a Redis that lost its
                         data starts them over, so the fence is the claim's token)
    jobs:ready:<lane>    sorted set: the lane's waiting jobs (queued, failed) by run_at
    jobs:running:<lane>  set: the lane's running jobs (what the lease watch reads)
    jobs:done, jobs:dead sorted sets: finished jobs by when they finished (the purge)
    jobs:all             sorted set: every job by id; jobs:task:<task> each task's (`recent`)
    jobs:owner:<owner>   set: the owner's unfinished jobs (its quota)
    jobs:key:<key>       the id of the job enqueued with this unique key (a clock's tick)

The scripts need Redis 7 (their flags), and name their keys inside rather than in KEYS,
which a single Redis allows and Redis Cluster (which this app does not use) would not.
Times and leases arrive as text (a float's repr) and are stored as they came: Lua's own
numbers print only 14 digits.
Waiting jobs with the same run_at are taken in the order of their ids as text ("10"
before "9"): run_at has microseconds, so that is a tie between jobs enqueued at once.
"""

# The first line of each script says what it may do (Redis 7's script flags). A script that
# grows the store is refused whole when Redis is out of memory (maxmemory), before it has
# written anything: the caller gets OOM, a full store, a wait. Scripts that only move,
# renew, end or delete jobs run even then: they are how a full queue drains, and a
# renewal refused would let another worker run the job beside its live one.
GROWS = "#!lua\n"
MOVES = "#!lua flags=allow-oom\n"
READS = "#!lua flags=no-writes\n"

LUA_HELPERS = """
local function running_lane(id, token)  -- the fence: the job's lane, if `token`'s claim runs it
  local job = redis.call('HMGET', 'job:' .. id, 'state', 'token', 'lane')
  return job[1] == 'running' and job[2] == token and job[3]
end
local function leave_running(id, lane, state, now, run_at)
  redis.call('SREM', 'jobs:running:' .. lane, id)
  if state == 'queued' or state == 'failed' then
    redis.call('ZADD', 'jobs:ready:' .. lane, run_at, id)
    redis.call('HSET', 'job:' .. id, 'run_at', run_at)
  else  -- done or dead: kept for the purge, and no longer counted against its owner
    redis.call('ZADD', 'jobs:' .. state, now, id)
    local owner = redis.call('HGET', 'job:' .. id, 'owner')
    if owner then redis.call('SREM', 'jobs:owner:' .. owner, id) end
  end
  redis.call('HSET', 'job:' .. id, 'state', state, 'updated_at', now)
end
"""
# ARGV: task, args, lane, owner, private, key, max_attempts, now, exempt, the three quotas,
# then the lanes. Returns the new id, nil for a key already there, or the quota's name.
ENQUEUE = GROWS + """
local task, args, lane, owner, private, key, max_attempts, now, exempt = unpack(ARGV, 1, 9)
if key ~= '' and redis.call('EXISTS', 'jobs:key:' .. key) == 1 then return false end
if exempt == '0' then
  local waiting = 0
  for i = 13, #ARGV do waiting = waiting + redis.call('ZCARD', 'jobs:ready:' .. ARGV[i]) end
  if waiting >= tonumber(ARGV[12]) then return 'queued' end
  if lane == 'public' and redis.call('ZCARD', 'jobs:ready:public') >= tonumber(ARGV[11])
    then return 'public' end
  if owner ~= '' and redis.call('SCARD', 'jobs:owner:' .. owner) >= tonumber(ARGV[10])
    then return 'own' end
end
local id = redis.call('INCR', 'jobs:next_id')
redis.call('HSET', 'job:' .. id, 'task', task, 'args', args, 'state', 'queued',
  'attempts', 0, 'max_attempts', max_attempts, 'private', private, 'lane', lane,
  'heartbeat', 0, 'run_at', now, 'created_at', now, 'updated_at', now)
if key ~= '' then
  redis.call('HSET', 'job:' .. id, 'key', key)
  redis.call('SET', 'jobs:key:' .. key, id)
end
if owner ~= '' then
  redis.call('HSET', 'job:' .. id, 'owner', owner)
  redis.call('SADD', 'jobs:owner:' .. owner, id)
end
redis.call('ZADD', 'jobs:ready:' .. lane, now, id)
redis.call('ZADD', 'jobs:all', id, id)
redis.call('ZADD', 'jobs:task:' .. task, id, id)
return id
"""
# ARGV: lane. Returns {id, token, heartbeat, lease} for each running job of the lane
# (token '' for a job claimed before tokens were stored).
SIGHTINGS = READS + """
local seen = {}
for _, id in ipairs(redis.call('SMEMBERS', 'jobs:running:' .. ARGV[1])) do
  local job = redis.call('HMGET', 'job:' .. id, 'token', 'heartbeat', 'lease')
  seen[#seen + 1] = {id, job[1] or '', job[2], job[3]}
end
return seen
"""
# ARGV: lane, worker, lease, now, the new claim's token, then (id, token, heartbeat) of
# each expired job. Recovers those still showing that pair, then claims; returns the job
# claimed, or nil.
CLAIM = MOVES + LUA_HELPERS + """
local lane, worker, lease, now, token = unpack(ARGV, 1, 5)
for i = 6, #ARGV, 3 do
  local id = ARGV[i]
  local job = redis.call('HMGET', 'job:' .. id, 'state', 'token', 'heartbeat',
                         'attempts', 'max_attempts', 'worker', 'run_at')
  if job[1] == 'running' and (job[2] or '') == ARGV[i + 1] and job[3] == ARGV[i + 2] then
    local spent = tonumber(job[4]) >= tonumber(job[5])
    leave_running(id, lane, spent and 'dead' or 'queued', now, job[7])
    redis.call('HSET', 'job:' .. id, 'error',
               'lease expired: worker ' .. job[6] .. ' stopped heartbeating')
  end
end
local ready = redis.call('ZRANGE', 'jobs:ready:' .. lane, '-inf', now, 'BYSCORE', 'LIMIT', 0, 1)
if #ready == 0 then return false end
local id = ready[1]
redis.call('ZREM', 'jobs:ready:' .. lane, id)
redis.call('SADD', 'jobs:running:' .. lane, id)
local attempt = redis.call('HINCRBY', 'job:' .. id, 'attempts', 1)
redis.call('HSET', 'job:' .. id, 'state', 'running', 'worker', worker, 'lease', lease,
           'token', token, 'heartbeat', 0, 'updated_at', now)
local job = redis.call('HMGET', 'job:' .. id, 'task', 'args', 'max_attempts')
return {id, job[1], job[2], attempt, job[3]}
"""
# ARGV: id, token. 1 if renewed, 0 if the job is no longer running under that claim.
EXTEND = MOVES + LUA_HELPERS + """
if not running_lane(ARGV[1], ARGV[2]) then return 0 end
redis.call('HINCRBY', 'job:' .. ARGV[1], 'heartbeat', 1)
return 1
"""
# ARGV: id, token, new state, now, run_at, attempts to add to max_attempts, result, error
# ('' for none). 1 if written, 0 if the job is no longer running under that claim.
END_ATTEMPT = MOVES + LUA_HELPERS + """
local id, token, state, now, run_at, more = unpack(ARGV, 1, 6)
local lane = running_lane(id, token)
if not lane then return 0 end
leave_running(id, lane, state, now, run_at)
redis.call('HINCRBY', 'job:' .. id, 'max_attempts', more)
for i, field in ipairs({'result', 'error'}) do
  if ARGV[6 + i] == '' then redis.call('HDEL', 'job:' .. id, field)
  else redis.call('HSET', 'job:' .. id, field, ARGV[6 + i]) end
end
return 1
"""
# ARGV: state (done or dead), cutoff time, how many to keep, batch. Deletes the oldest
# past the cutoff or beyond the newest `keep`, at most `batch`; returns how many.
PURGE = MOVES + """
local finished = 'jobs:' .. ARGV[1]
local old = redis.call('ZCOUNT', finished, '-inf', '(' .. ARGV[2])
local beyond = redis.call('ZCARD', finished) - tonumber(ARGV[3])
local count = math.min(tonumber(ARGV[4]), math.max(old, beyond))
if count <= 0 then return 0 end
for _, id in ipairs(redis.call('ZRANGE', finished, 0, count - 1)) do
  local job = redis.call('HMGET', 'job:' .. id, 'task', 'key')
  redis.call('ZREM', 'jobs:all', id)
  if job[1] then redis.call('ZREM', 'jobs:task:' .. job[1], id) end
  if job[2] then redis.call('DEL', 'jobs:key:' .. job[2]) end
  redis.call('DEL', 'job:' .. id)
end
redis.call('ZREMRANGEBYRANK', finished, 0, count - 1)
return count
"""
