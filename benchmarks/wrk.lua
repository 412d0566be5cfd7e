-- bench.py's two workloads for wrk: `wrk -s wrk.lua URL -- session` (or `-- healthz`).
--
-- session: each client logs in once (POST /login) and keeps its `sid` cookie, as a browser
-- does; then every request adds to its cart (POST /cart) with that cookie.
-- healthz: GET /healthz, the cheapest request, what a front door itself costs.
--
-- Why one thread per connection (bench.py runs `wrk -t N -c N`): wrk gives each thread one
-- Lua state, shared by all that thread's connections, and tells no callback which
-- connection it serves. With one connection a thread, a thread's variables are one
-- client's: its cookie, its name.
--
-- Why "Connection: close": webapp.py and the router speak HTTP/1.0, one request per
-- connection, so every configuration is measured that way; wrk opens a new connection
-- after each response that does not keep the connection alive.
--
-- What done() prints, on one line that bench.py reads: wrk's own count of requests and of
-- its errors (connect, read, write, timeout; `status` is every answer of 400 or more), and
-- `lost`, counted here: a login answered without a session cookie, or a cart answered
-- with a new one (the copy had forgotten the session). wrk's latency percentiles are
-- "corrected" for coordinated omission: a stall counts as if requests had kept arriving
-- on schedule, so a few long stalls raise p99 more than clients saw it.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("number", #threads)
end

function init(args)
   workload = args[1] or "session"
   if workload ~= "session" and workload ~= "healthz" then
      error("unknown workload " .. workload .. ": use session or healthz")
   end
   sid = nil   -- this client's session id, once logged in
   lost = 0
end

function request()
   if workload == "healthz" then
      return wrk.format("GET", "/healthz", {["Connection"] = "close"})
   end
   local headers = {["Connection"] = "close",
                    ["Content-Type"] = "application/x-www-form-urlencoded"}
   if sid == nil then
      return wrk.format("POST", "/login", headers, "name=client" .. number)
   end
   headers["Cookie"] = "sid=" .. sid
   return wrk.format("POST", "/cart", headers, "item=i" .. number)
end

function response(status, headers, body)
   if workload ~= "session" or status >= 400 then
      return  -- wrk counts statuses of 400 and more itself
   end
   local cookie = headers["Set-Cookie"] or headers["set-cookie"] or ""
   local new_sid = cookie:match("^sid=([^;]+)")
   if (sid == nil) ~= (new_sid ~= nil) then
      lost = lost + 1
   end
   sid = new_sid or sid
end

function done(summary, latency, requests)
   local lost_in_all = 0
   for _, thread in ipairs(threads) do
      lost_in_all = lost_in_all + thread:get("lost")
   end
   local errors = summary.errors
   io.write(string.format(
      "bench: requests=%d seconds=%.3f p50_ms=%.3f p99_ms=%.3f connect=%d read=%d " ..
      "write=%d timeout=%d status=%d lost=%d\n",
      summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
      latency:percentile(99) / 1e3, errors.connect, errors.read, errors.write,
      errors.timeout, errors.status, lost_in_all))
end
