"""Our changes to ggml-rpc's TCP transport (transport.cpp), as edits: buffered writes and
reads, flushed when a request waits for its reply (see rpc_patch.py for the client's)."""

from __future__ import annotations

from meshllm.native.edits import Edit

TRANSPORT_EDITS: tuple[Edit, ...] = (
    Edit(
        "TCP write and read buffers",
        """    bool     use_rdma;
    sockfd_t fd;""",
        """    bool     use_rdma;
    sockfd_t fd;
    // mesh-llm: a message's header and body leave in one send, and the many small
    // messages of a decode step in as few as possible; reads are served from a buffer.
    // The write buffer has its own mutex: in pipelined mode one thread may flush it
    // (before reading a reply) while another writes a message under the I/O mutex.
    std::vector<uint8_t> wbuf;
    std::mutex           wmutex;
    std::vector<uint8_t> rbuf;
    size_t               rpos = 0;
    size_t               rlen = 0;
    bool tcp_send_all(const void * data, size_t size);
    bool tcp_flush();
    bool tcp_flush_locked();""",
    ),
    Edit(
        "buffered TCP send",
        """    size_t bytes_sent = 0;
    while (bytes_sent < size) {""",
        """    std::lock_guard<std::mutex> lock(wmutex);
    if (size < TCP_BUFFER_SIZE) {
        const uint8_t * bytes = (const uint8_t *)data;
        wbuf.insert(wbuf.end(), bytes, bytes + size);
        return wbuf.size() < TCP_BUFFER_SIZE || tcp_flush_locked();
    }
    return tcp_flush_locked() && tcp_send_all(data, size);
}

bool socket_t::impl::tcp_flush() {
    std::lock_guard<std::mutex> lock(wmutex);
    return tcp_flush_locked();
}

bool socket_t::impl::tcp_flush_locked() {
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
