"""Our changes to ggml's RPC client and its TCP transport, as edits to the vendored source.

Stock ggml-rpc hands every message to a dispatcher thread and, for synchronous calls,
waits on a future until that thread has written it; and it writes each message as three
TCP segments. A decode step of a split model makes about ten calls per stage (a graph
input copied to the stage, a synchronize before each, the graph compute, the output read
back), so each token paid some 50 thread hand-offs on the head, ~30 segments per stage
(each one a frame through the gRPC tunnel) and as many blocking reads on the stage: on a
small model over a millisecond a token, most of the gap between a split and the whole.

The changes:
- with nothing queued, the calling thread writes the message (and reads the reply) itself,
  under a mutex the dispatcher thread also takes; `synchronize` and `event_record` return
  at once when nothing is queued; large asynchronous writes (weights while loading) still
  go through the dispatcher thread so loading keeps overlapping;
- messages without a reply wait in a write buffer until the next request that waits for
  one, and reads are buffered: a decode step crosses each link as one write and one reply;
- weight tensors from 64 KiB up are offered by hash before their bytes (stock: over 10 MB
  only), so a warm reload of a small model sends almost nothing.
The wire protocol is unchanged, so a patched client talks to stock servers and the reverse.

Each edit names text that must occur exactly once in the vendored source; when llama.cpp
changes under us the build stops and says which anchor moved.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Edit:
    why: str
    anchor: str
    replacement: str


class PatchError(Exception):
    pass


EDITS: tuple[Edit, ...] = (
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
    rpc_msg_queue    queue;
    std::mutex       io_mutex;
    std::atomic_int  in_flight{0};
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
    std::lock_guard<std::mutex> io(io_mutex);
    if (in_flight.load(std::memory_order_acquire) != 0) {
        return false;
    }
    bool status = output != nullptr
        ? send_rpc_cmd(sock, cmd, input, input_size, output, output_size)
        : send_rpc_cmd(sock, cmd, input, input_size);
    RPC_STATUS_ASSERT(status);
    return true;
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
            std::lock_guard<std::mutex> io(io_mutex);
            if (msg_ptr->output) {""",
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
)


TRANSPORT_EDITS: tuple[Edit, ...] = (
    Edit(
        "TCP write and read buffers",
        """    bool     use_rdma;
    sockfd_t fd;""",
        """    bool     use_rdma;
    sockfd_t fd;
    // mesh-llm: a message's header and body leave in one send, and the many small
    // messages of a decode step in as few as possible; reads are served from a buffer.
    std::vector<uint8_t> wbuf;
    std::vector<uint8_t> rbuf;
    size_t               rpos = 0;
    size_t               rlen = 0;
    bool tcp_send_all(const void * data, size_t size);
    bool tcp_flush();""",
    ),
    Edit(
        "buffered TCP send",
        """    size_t bytes_sent = 0;
    while (bytes_sent < size) {""",
        """    if (size < TCP_BUFFER_SIZE) {
        const uint8_t * bytes = (const uint8_t *)data;
        wbuf.insert(wbuf.end(), bytes, bytes + size);
        return wbuf.size() < TCP_BUFFER_SIZE || tcp_flush();
    }
    return tcp_flush() && tcp_send_all(data, size);
}

bool socket_t::impl::tcp_flush() {
    if (wbuf.empty()) {
        return true;
    }
    bool ok = tcp_send_all(wbuf.data(), wbuf.size());
    wbuf.clear();
    return ok;
}

bool socket_t::impl::tcp_send_all(const void * data, size_t size) {
    size_t bytes_sent = 0;
    while (bytes_sent < size) {""",
    ),
    Edit(
        "buffered TCP receive that first sends what is waiting",
        """    size_t bytes_recv = 0;
    while (bytes_recv < size) {
        size_t size_to_recv = std::min(size - bytes_recv, MAX_CHUNK_SIZE);""",
        """    if (!tcp_flush()) {
        return false;  // never wait for a reply to bytes still in our buffer
    }
    size_t bytes_recv = std::min(size, rlen - rpos);
    if (bytes_recv > 0) {
        memcpy(data, rbuf.data() + rpos, bytes_recv);
        rpos += bytes_recv;
    }
    // small reads refill the buffer; large ones (tensors) go straight to the caller
    while (bytes_recv < size && size - bytes_recv < TCP_BUFFER_SIZE) {
        rbuf.resize(TCP_BUFFER_SIZE);
        ssize_t n = recv(fd, (char *)rbuf.data(), rbuf.size(), 0);
        if (n <= 0) {
            GGML_LOG_ERROR("recv failed or peer closed (bytes_recv=%zu)\\n", bytes_recv);
            return false;
        }
        rlen = (size_t)n;
        rpos = std::min(size - bytes_recv, rlen);
        memcpy((char *)data + bytes_recv, rbuf.data(), rpos);
        bytes_recv += rpos;
    }
    while (bytes_recv < size) {
        size_t size_to_recv = std::min(size - bytes_recv, MAX_CHUNK_SIZE);""",
    ),
    Edit(
        "flush sends the TCP buffer",
        """        return rdma->flush();
    }
#endif
    return true;
}""",
        """        return rdma->flush();
    }
#endif
    return use_rdma || tcp_flush();
}""",
    ),
    Edit(
        "buffer size",
        "struct socket_t::impl {",
        """static constexpr size_t TCP_BUFFER_SIZE = 64 * 1024;

struct socket_t::impl {""",
    ),
)


def apply(source: str, edits: tuple[Edit, ...] = EDITS) -> str:
    """The source with every edit applied; PatchError names the first anchor not found once."""
    for edit in edits:
        count = source.count(edit.anchor)
        if count != 1:
            raise PatchError(
                f"ggml-rpc.cpp: the anchor for '{edit.why}' occurs {count} times (expected 1);"
                " llama.cpp changed under this patch: update meshllm/native/rpc_patch.py")
        source = source.replace(edit.anchor, edit.replacement)
    return source
