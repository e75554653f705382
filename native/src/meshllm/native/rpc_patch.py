"""Our changes to ggml's RPC client and its TCP transport, as edits to the vendored source.

Stock ggml-rpc hands every message to a dispatcher thread and, for synchronous calls,
waits on a future until that thread has written it; and it writes each message as three
TCP segments. A decode step of a split model makes about ten calls per stage (a graph
input copied to the stage, a synchronize before each, the graph compute, the output read
back), so each token paid some 50 thread hand-offs on the head, ~30 segments per stage
(each one a frame through the gRPC tunnel) and as many blocking reads on the stage: on a
small model over a millisecond a token, most of the gap between a split and the whole.

The changes (the transport's are in transport_patch.py):
- with nothing queued, the calling thread writes the message (and reads the reply) itself,
  under a mutex the dispatcher thread also takes; `synchronize` and `event_record` return
  at once when nothing is queued; large asynchronous writes (weights while loading) still
  go through the dispatcher thread so loading keeps overlapping;
- messages without a reply wait in a write buffer until the next request that waits for
  one, and reads are buffered: a decode step crosses each link as one write and one reply;
- weight tensors from 64 KiB up are offered by hash before their bytes (stock: over 10 MB
  only), so a warm reload of a small model sends almost nothing;
- the cache's hash (FNV-1a of a tensor's bytes) is exported
  (`ggml_backend_rpc_meshllm_cache_hash`), so that a worker holding the model file fills
  its stage's cache before the head loads;
- the check of the stage's stored graph and the send that replaces it are one step, so two
  llama contexts on one RPC device, decoding from two threads, cannot leave the stage
  recomputing the other context's graph; the TCP write buffer has its own mutex, so a
  thread reading replies may flush it while another thread writes.
Opt-in, per endpoint (`ggml_backend_rpc_meshllm_set_pipelined(endpoint, 1)`, exported by
our library, called before the connection opens): a request that waits for a reply releases
the socket once it is written, and the replies, which the server sends in request order, are
read in FIFO order by whichever waiter holds the reading turn and handed to their waiters.
Then a second context's inputs and graph go out while the first context's step computes on
the stage (docs/split-latency.md section 4). Off, the client behaves as before.
The wire protocol is unchanged, so a patched client talks to stock servers and the reverse.

Each edit names text that must occur exactly once in the vendored source; when llama.cpp
changes under us the build stops and says which anchor moved.
"""

from __future__ import annotations

from meshllm.native.edits import Edit, PatchError, apply
from meshllm.native.transport_patch import TRANSPORT_EDITS

__all__ = ["EDITS", "TRANSPORT_EDITS", "Edit", "PatchError", "apply"]


EDITS: tuple[Edit, ...] = (
    Edit(
        "the opt-in pipelining flag",
        """    void start(const std::string & endpoint);
    void work();""",
        """    void start(const std::string & endpoint);
    void work();

    // mesh-llm: opt-in per endpoint (ggml_backend_rpc_meshllm_set_pipelined), fixed when the
    // connection opens: a request with a reply releases the socket once written
    std::atomic_bool pipelined{false};""",
    ),
    Edit(
        "weights from 64 KiB up are sent by hash first; a size limit for inline writes",
        "const size_t HASH_THRESHOLD = 10 * 1024 * 1024;",
        """// mesh-llm: stock ggml sends weights below 10 MB in full on every load, which for a
// small model is all of them. A hash first costs one round trip per tensor on a cold load
// and saves the tensor's bytes on every reload once the stage's cache has it.
const size_t HASH_THRESHOLD = 64 * 1024;

// mesh-llm: asynchronous messages up to this size are written by the caller when nothing
// is queued; bigger ones (weights while loading) stay on the dispatcher thread.
const size_t RPC_INLINE_MAX_SIZE = 256 * 1024;""",
    ),
    Edit(
        "messages without a reply wait in the write buffer for the next request",
        """    if (!sock->send_data(input, input_size)) {
        return false;
    }
    return sock->flush();
}""",
        """    if (!sock->send_data(input, input_size)) {
        return false;
    }
    // mesh-llm: a message without a reply (tensor writes, graph compute) leaves with the
    // next request that waits for one: the server handles a connection's messages in
    // order and the client learns nothing before it reads a reply, which flushes first.
    // A decode step then crosses the link as one write and one reply.
    return true;
}""",
    ),
    Edit(
        "dispatcher state: an I/O mutex and a count of queued messages",
        """    rpc_msg_queue    queue;
    socket_ptr       sock;""",
        """    bool run_inline(enum rpc_cmd cmd, const void * input, size_t input_size,
                    void * output, size_t output_size);
    void enqueue(const rpc_msg_ptr & msg);
    struct rpc_reply {
        void * output;
        size_t output_size;
        bool   done = false;
        bool   ok   = false;
    };
    bool call_pipelined(std::unique_lock<std::mutex> & io, enum rpc_cmd cmd,
                        const void * input, size_t input_size, void * output, size_t output_size);
    bool await_reply(rpc_reply & mine);
    rpc_msg_queue    queue;
    std::mutex       io_mutex;
    std::atomic_int  in_flight{0};
    // pipelined mode: replies not read yet, in request order; one waiter reads at a time
    std::mutex                reply_mutex;
    std::condition_variable   reply_cv;
    std::deque<rpc_reply *>   replies;
    bool                      reading = false;
    socket_ptr       sock;""",
    ),
    Edit(
        "synchronous send without a reply",
        """    msg->output = nullptr;
    msg->output_size = 0;
    GGML_ASSERT(queue.push(msg));
    auto future = msg->completion.get_future();
    future.wait();
}""",
        """    msg->output = nullptr;
    msg->output_size = 0;
    auto future = msg->completion.get_future();
    if (run_inline(cmd, input.get(), input_size, nullptr, 0)) {
        return;
    }
    enqueue(msg);
    future.wait();
}""",
    ),
    Edit(
        "synchronous send with a reply",
        """    msg->output = output;
    msg->output_size = output_size;
    GGML_ASSERT(queue.push(msg));
    auto future = msg->completion.get_future();
    future.wait();
}""",
        """    msg->output = output;
    msg->output_size = output_size;
    auto future = msg->completion.get_future();
    if (run_inline(cmd, input.get(), input_size, output, output_size)) {
        return;
    }
    enqueue(msg);
    future.wait();
}""",
    ),
    Edit(
        "asynchronous send without a reply (graph inputs, graph compute)",
        """    msg->output = nullptr;
    msg->output_size = 0;
    GGML_ASSERT(queue.push(msg));
}""",
        """    msg->output = nullptr;
    msg->output_size = 0;
    if (input_size <= RPC_INLINE_MAX_SIZE && run_inline(cmd, input.get(), input_size, nullptr, 0)) {
        return;
    }
    enqueue(msg);
}""",
    ),
    Edit(
        "asynchronous send with a reply stays asynchronous",
        """    msg->output = output;
    msg->output_size = output_size;
    GGML_ASSERT(queue.push(msg));
}""",
        """    msg->output = output;
    msg->output_size = output_size;
    enqueue(msg);
}""",
    ),
    Edit(
        "the inline path and the counted queue",
        "ggml_backend_event_t rpc_dispatcher::event_new(",
        """// mesh-llm: with nothing queued, the caller's thread talks to the socket itself, which
// saves two thread hand-offs per message.
bool rpc_dispatcher::run_inline(enum rpc_cmd cmd, const void * input, size_t input_size,
                                void * output, size_t output_size) {
    std::unique_lock<std::mutex> io(io_mutex);
    if (in_flight.load(std::memory_order_acquire) != 0) {
        return false;
    }
    bool status;
    if (output != nullptr && pipelined.load(std::memory_order_relaxed)) {
        status = call_pipelined(io, cmd, input, input_size, output, output_size);
    } else {
        status = output != nullptr
            ? send_rpc_cmd(sock, cmd, input, input_size, output, output_size)
            : send_rpc_cmd(sock, cmd, input, input_size);
    }
    RPC_STATUS_ASSERT(status);
    return true;
}

// mesh-llm, pipelined mode: the request leaves (with whatever waited in the write buffer)
// and its reply slot joins the FIFO under the I/O mutex, so slots are in request order;
// the mutex is then released, and another thread (a second context on this device) can
// send its step while this one computes on the server.
bool rpc_dispatcher::call_pipelined(std::unique_lock<std::mutex> & io, enum rpc_cmd cmd,
                                    const void * input, size_t input_size,
                                    void * output, size_t output_size) {
    rpc_reply mine{output, output_size};
    if (!send_rpc_cmd(sock, cmd, input, input_size) || !sock->flush()) {
        return false;
    }
    {
        std::lock_guard<std::mutex> lock(reply_mutex);
        replies.push_back(&mine);
    }
    io.unlock();
    return await_reply(mine);
}

// The server answers in request order: the waiter holding the reading turn reads the
// oldest reply into its owner's buffer (the owner waits here until it is done), and goes
// on until its own has come.
bool rpc_dispatcher::await_reply(rpc_reply & mine) {
    std::unique_lock<std::mutex> lock(reply_mutex);
    while (!mine.done) {
        if (reading) {
            reply_cv.wait(lock);
            continue;
        }
        reading = true;
        rpc_reply * front = replies.front();
        lock.unlock();
        uint64_t size = 0;
        bool ok = sock->recv_data(&size, sizeof(size)) && size == front->output_size
                  && sock->recv_data(front->output, front->output_size);
        lock.lock();
        replies.pop_front();
        front->ok = ok;
        front->done = true;
        reading = false;
        reply_cv.notify_all();
    }
    return mine.ok;
}

void rpc_dispatcher::enqueue(const rpc_msg_ptr & msg) {
    in_flight.fetch_add(1, std::memory_order_acq_rel);
    GGML_ASSERT(queue.push(msg));
}

ggml_backend_event_t rpc_dispatcher::event_new(""",
    ),
    Edit(
        "a new event is queued like any message",
        """    ev->sf = ev->msg->completion.get_future().share();
    GGML_ASSERT(queue.push(ev->msg));
    return new""",
        """    ev->sf = ev->msg->completion.get_future().share();
    enqueue(ev->msg);
    return new""",
    ),
    Edit(
        "recording an event with nothing queued completes it at once",
        """    ev->sf = ev->msg->completion.get_future().share();
    GGML_ASSERT(queue.push(ev->msg));
}""",
        """    ev->sf = ev->msg->completion.get_future().share();
    if (in_flight.load(std::memory_order_acquire) == 0) {
        ev->msg->completion.set_value();
        return;
    }
    enqueue(ev->msg);
}""",
    ),
    Edit(
        "synchronize with nothing queued returns at once",
        """    auto msg = std::make_shared<rpc_msg>();
    msg->cmd = RPC_CMD_NONE;
    GGML_ASSERT(queue.push(msg));
    msg->completion.get_future().wait();""",
        """    if (in_flight.load(std::memory_order_acquire) == 0) {
        return;
    }
    auto msg = std::make_shared<rpc_msg>();
    msg->cmd = RPC_CMD_NONE;
    auto future = msg->completion.get_future();
    enqueue(msg);
    future.wait();""",
    ),
    Edit(
        "the dispatcher thread holds the I/O mutex while it talks to the socket",
        """        if (msg_ptr->cmd != RPC_CMD_NONE) {
            if (msg_ptr->output) {""",
        """        if (msg_ptr->cmd != RPC_CMD_NONE) {
            std::unique_lock<std::mutex> io(io_mutex);
            if (msg_ptr->output && pipelined.load(std::memory_order_relaxed)) {
                bool status = call_pipelined(io, msg_ptr->cmd, msg_ptr->input.get(),
                                             msg_ptr->input_size, msg_ptr->output,
                                             msg_ptr->output_size);
                RPC_STATUS_ASSERT(status);
            } else if (msg_ptr->output) {""",
    ),
    Edit(
        "a message leaves the count before its waiter wakes",
        """        msg_ptr->completion.set_value();
    }
}""",
        """        in_flight.fetch_sub(1, std::memory_order_acq_rel);
        msg_ptr->completion.set_value();
    }
}""",
    ),
    Edit(
        "the stored-graph check and its send are one step",
        """    GGML_ASSERT(cgraph->n_nodes > 0);
    bool reuse = cgraph->uid != 0 && rpc_dev_ctx->last_graph_uid == cgraph->uid;""",
        """    GGML_ASSERT(cgraph->n_nodes > 0);
    // mesh-llm: the server keeps one graph per device. Two contexts on this device,
    // decoding from two threads, must not interleave here: A finds its graph stored,
    // B replaces it, and A's GRAPH_RECOMPUTE would run B's graph.
    static std::mutex graph_mutex;
    std::lock_guard<std::mutex> graph_lock(graph_mutex);
    bool reuse = cgraph->uid != 0 && rpc_dev_ctx->last_graph_uid == cgraph->uid;""",
    ),
    Edit(
        "the opt-in: which endpoints are pipelined",
        """static std::shared_ptr<rpc_dispatcher> get_dispatcher(const std::string & endpoint) {
    static std::mutex mutex;
    std::lock_guard<std::mutex> lock(mutex);""",
        """// mesh-llm: the endpoints whose connections are pipelined (rpc_dispatcher::
// call_pipelined), guarded by get_dispatcher's mutex.
static std::unordered_set<std::string> & meshllm_pipelined_endpoints() {
    static std::unordered_set<std::string> endpoints;
    return endpoints;
}

static std::mutex & meshllm_dispatchers_mutex() {
    static std::mutex mutex;
    return mutex;
}

// Opt-in pipelining for connections to `endpoint` opened after this call: call it after
// ggml_backend_rpc_add_server (whose connection is closed again) and before loading the
// model. Off by default: a request holds the socket until its reply, as before.
extern "C" {
GGML_BACKEND_API void ggml_backend_rpc_meshllm_set_pipelined(const char * endpoint, int on);
}

void ggml_backend_rpc_meshllm_set_pipelined(const char * endpoint, int on) {
    std::lock_guard<std::mutex> lock(meshllm_dispatchers_mutex());
    if (on) {
        meshllm_pipelined_endpoints().insert(endpoint);
    } else {
        meshllm_pipelined_endpoints().erase(endpoint);
    }
}

static std::shared_ptr<rpc_dispatcher> get_dispatcher(const std::string & endpoint) {
    std::lock_guard<std::mutex> lock(meshllm_dispatchers_mutex());""",
    ),
    Edit(
        "new connections to an opted-in endpoint are pipelined",
        """    auto dispatcher = std::make_shared<rpc_dispatcher>();
    dispatcher->start(endpoint);""",
        """    auto dispatcher = std::make_shared<rpc_dispatcher>();
    dispatcher->start(endpoint);
    dispatcher->pipelined = meshllm_pipelined_endpoints().count(endpoint) > 0;""",
    ),
    Edit(
        "the cache hash, exported for priming a stage's cache from a local model file",
        """    for (size_t i = 0; i < len; ++i) {
        hash ^= data[i];
        hash *= fnv_prime;
    }
    return hash;
}""",
        """    for (size_t i = 0; i < len; ++i) {
        hash ^= data[i];
        hash *= fnv_prime;
    }
    return hash;
}

// mesh-llm: a stage server finds a tensor in its cache by this hash of its bytes, so a
// worker that can read the model file writes the entries itself (worker/stage_cache.py)
// and the head's weights never cross the link.
extern "C" __attribute__((visibility("default")))
uint64_t ggml_backend_rpc_meshllm_cache_hash(const void * data, size_t len) {
    return fnv_hash((const uint8_t *) data, len);
}""",
    ),
)
