-- wrk script of the bench harness (bench/loadgen.py sets these environment variables):
--   BENCH_MODE       fixed  : one token, the request is built once (fastest for wrk)
--                    rotate : tokens from BENCH_TOKEN_FILE, one per line, rotated per request
--                    unique : a new opaque token per request ("op-<nonce>-<thread>-<n>")
--                    paths  : paths from BENCH_PATH_FILE, one per line, rotated per request,
--                             each with BENCH_TOKEN (when set), each request built once
--                    dpop   : "Authorization: DPoP BENCH_TOKEN" with a DPoP proof from
--                             BENCH_PROOF_FILE, one per line, each sent once (a proof sent again
--                             is a replay, RFC 9449 §11.1): thread k of BENCH_THREADS sends lines
--                             k, k + BENCH_THREADS, ...; out of proofs, the thread stops
--   BENCH_TOKEN      the token of modes fixed and paths ("" = no Authorization header)
--   BENCH_TOKEN_FILE the tokens of mode rotate
--   BENCH_PATH_FILE  the paths of mode paths (a path may be tens of kilobytes long)
--   BENCH_PROOF_FILE the proofs of mode dpop; BENCH_THREADS: wrk's thread count
--   BENCH_NONCE      makes mode unique's tokens differ from one run to the next
--   BENCH_DELAY_MS   > 0: wait this long before each request on a connection (paced load)
--   BENCH_STOP_AFTER > 0: each thread stops after sending this many requests
--   BENCH_OUT        where done() writes the JSON summary, with the latency histogram
local mode = os.getenv("BENCH_MODE") or "fixed"
local token = os.getenv("BENCH_TOKEN") or ""
local token_file = os.getenv("BENCH_TOKEN_FILE")
local path_file = os.getenv("BENCH_PATH_FILE")
local proof_file = os.getenv("BENCH_PROOF_FILE")
local thread_total = tonumber(os.getenv("BENCH_THREADS") or "1")
local nonce = os.getenv("BENCH_NONCE") or "n"
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local stop_after = tonumber(os.getenv("BENCH_STOP_AFTER") or "0")
local out = os.getenv("BENCH_OUT")

wrk.headers["Host"] = "api.bench.example"

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("id", thread_count)
  table.insert(threads, thread)
end

local reqs = {}
local n, i, sent = 0, 0, 0

function init(args)
  if mode == "fixed" or mode == "paths" then
    if token ~= "" then
      wrk.headers["Authorization"] = "Bearer " .. token
    end
  end
  if mode == "paths" then
    for line in io.lines(path_file) do
      if line ~= "" then
        n = n + 1
        reqs[n] = wrk.format(nil, line)
      end
    end
    i = (id - 1) % n
  elseif mode == "rotate" then
    for line in io.lines(token_file) do
      if line ~= "" then
        n = n + 1
        reqs[n] = wrk.format(nil, nil, { ["Authorization"] = "Bearer " .. line })
      end
    end
    -- threads start at different places in the list
    i = ((id - 1) * 7919) % n
  elseif mode == "dpop" then
    local k = 0
    for line in io.lines(proof_file) do
      if line ~= "" then
        if k % thread_total == id - 1 then
          n = n + 1
          -- headers given replace wrk.headers: the Host (the proof's htu has it) is set again
          reqs[n] = wrk.format(nil, nil, {
            ["Host"] = wrk.headers["Host"], ["Authorization"] = "DPoP " .. token, ["DPoP"] = line,
          })
        end
        k = k + 1
      end
    end
  end
end

local function count()
  sent = sent + 1
  if stop_after > 0 and sent >= stop_after then
    wrk.thread:stop()
  end
end

if mode == "rotate" or mode == "paths" then
  function request()
    i = i + 1
    if i > n then i = 1 end
    count()
    return reqs[i]
  end
elseif mode == "dpop" then
  function request()
    i = i + 1
    count()
    if i >= n then
      -- the last proof: nothing may be sent again (the harness marks the point as run out)
      wrk.thread:stop()
      if i > n then i = n end
    end
    return reqs[i]
  end
elseif mode == "unique" then
  function request()
    count()
    return wrk.format(nil, nil,
      { ["Authorization"] = string.format("Bearer op-%s-%d-%d", nonce, id, sent) })
  end
elseif stop_after > 0 then
  local fixed
  function request()
    if fixed == nil then fixed = wrk.format() end
    count()
    return fixed
  end
end

if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

function done(summary, latency, requests)
  local f = assert(io.open(out, "w"))
  local e = summary.errors
  f:write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout))
  if summary.requests > 0 then
    f:write(string.format(
      '"wrk_latency_us":{"min":%d,"max":%d,"mean":%.1f,"p50":%d,"p99":%d,"p999":%d},',
      latency.min, latency.max, latency.mean,
      latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
  end
  -- the histogram: [latency in µs, count] for each distinct latency value seen. In wrk 4.1,
  -- #latency is the number of distinct values and latency(i) returns the i-th (value, count).
  f:write('"histogram":[')
  if summary.requests > 0 then
    for k = 1, #latency do
      local v, c = latency(k)
      if k > 1 then f:write(",") end
      f:write(string.format("[%d,%d]", v, c))
    end
  end
  f:write("]}\n")
  f:close()
end
