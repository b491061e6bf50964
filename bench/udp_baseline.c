/*
 * Baseline for bench/bench_udp.py: a minimal single-threaded TUN <-> UDP loop moving one packet
 * per system call, the design of flannel's C udp proxy (non-blocking fds, alternate one packet
 * each way until both are idle, then poll). Written for this benchmark only.
 *
 *   udp_baseline TUN_NAME LOCAL_IP PORT PEER_NET PEER_PREFIXLEN PEER_IP
 *
 * Creates TUN_NAME (IFF_TUN | IFF_NO_PI); the caller addresses it and sets routes. Packets from
 * the TUN device whose destination is inside PEER_NET/PEER_PREFIXLEN go to PEER_IP:PORT; datagrams
 * from PEER_IP are written into the TUN device. TTL is decremented both ways (RFC 1624 update).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

static int ttl_down(unsigned char *pkt)
{
	struct iphdr *ip = (struct iphdr *)pkt;
	uint32_t sum;

	if (ip->ttl <= 1)
		return 0;
	ip->ttl--;
	/* RFC 1624: HC' = HC + 0x0100 (TTL is the high byte of its word), end-around carry */
	sum = (uint32_t)ntohs(ip->check) + 0x0100;
	sum = (sum & 0xffff) + (sum >> 16);
	ip->check = htons((uint16_t)sum);
	return 1;
}

/* A full socket buffer waits for room (as a blocking socket would) instead of dropping. */
static void send_one(int sock, const unsigned char *buf, size_t n, const struct sockaddr_in *peer)
{
	while (sendto(sock, buf, n, 0, (const struct sockaddr *)peer, sizeof(*peer)) < 0) {
		struct pollfd out = {sock, POLLOUT, 0};

		if (errno != EAGAIN || poll(&out, 1, 100) < 0)
			return;
	}
}

int main(int argc, char **argv)
{
	static unsigned char buf[65536];
	struct ifreq ifr;
	struct sockaddr_in local = {0}, peer = {0}, from;
	socklen_t fromlen;
	uint32_t net, mask;
	int tun, sock, plen, busy, bufsize = 4 << 20;
	ssize_t n;

	if (argc != 7) {
		fprintf(stderr, "usage: %s TUN LOCAL_IP PORT PEER_NET PREFIXLEN PEER_IP\n", argv[0]);
		return 2;
	}
	tun = open("/dev/net/tun", O_RDWR | O_NONBLOCK);
	if (tun < 0) {
		perror("open /dev/net/tun");
		return 1;
	}
	memset(&ifr, 0, sizeof(ifr));
	ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
	strncpy(ifr.ifr_name, argv[1], IFNAMSIZ - 1);
	if (ioctl(tun, TUNSETIFF, &ifr) < 0) {
		perror("TUNSETIFF");
		return 1;
	}
	sock = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
	/* the same 4 MiB socket buffers as the Python backend, for a fair comparison */
	setsockopt(sock, SOL_SOCKET, SO_SNDBUFFORCE, &bufsize, sizeof(bufsize));
	setsockopt(sock, SOL_SOCKET, SO_RCVBUFFORCE, &bufsize, sizeof(bufsize));
	local.sin_family = AF_INET;
	local.sin_port = htons(atoi(argv[3]));
	inet_pton(AF_INET, argv[2], &local.sin_addr);
	if (bind(sock, (struct sockaddr *)&local, sizeof(local)) < 0) {
		perror("bind");
		return 1;
	}
	inet_pton(AF_INET, argv[4], &net);
	plen = atoi(argv[5]);
	mask = plen ? htonl(0xffffffffu << (32 - plen)) : 0;
	peer.sin_family = AF_INET;
	peer.sin_port = local.sin_port;
	inet_pton(AF_INET, argv[6], &peer.sin_addr);
	printf("ready\n");
	fflush(stdout);

	for (;;) {
		struct pollfd fds[2] = {{tun, POLLIN, 0}, {sock, POLLIN, 0}};

		do {
			busy = 0;
			n = read(tun, buf, sizeof(buf));
			if (n >= 20) {
				struct iphdr *ip = (struct iphdr *)buf;

				busy = 1;
				if (ip->version == 4 && (ip->daddr & mask) == net && ttl_down(buf))
					send_one(sock, buf, n, &peer);
			}
			fromlen = sizeof(from);
			n = recvfrom(sock, buf, sizeof(buf), 0, (struct sockaddr *)&from, &fromlen);
			if (n >= 20) {
				busy = 1;
				if (from.sin_addr.s_addr == peer.sin_addr.s_addr && (buf[0] >> 4) == 4 &&
				    ttl_down(buf))
					if (write(tun, buf, n) < 0 && errno != EAGAIN)
						perror("write tun");
			}
		} while (busy);
		if (poll(fds, 2, -1) < 0 && errno != EINTR) {
			perror("poll");
			return 1;
		}
	}
}
