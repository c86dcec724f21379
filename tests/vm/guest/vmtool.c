/*
 * vmtool: tiny static helper for the vfiod real-kernel test guest.
 *
 *   vmtool now                 print CLOCK_REALTIME as seconds.nanoseconds
 *   vmtool mono                print CLOCK_MONOTONIC as seconds.nanoseconds
 *   vmtool uevmon [SUBSYSTEM [udev]]
 *                              listen to KERNEL uevents (netlink group 1), or
 *                              with "udev" to what systemd-udevd re-broadcasts
 *                              after its rules ran (group 2), and print one
 *                              line per event, stamped with CLOCK_REALTIME at
 *                              the moment recv returned:
 *                              "<sec.nsec> <ACTION> <DEVPATH> [DRIVER=..]"
 *   vmtool vfiohold GROUP ADDR  open /dev/vfio/vfio (the container) and
 *                              /dev/vfio/GROUP, VFIO_SET_IOMMU (type1v2), get
 *                              ADDR's device fd (VFIO_GROUP_GET_DEVICE_FD) and
 *                              hold all three open (as a VM would) until
 *                              killed; prints "holding ... pid N fds C G D"
 *                              once everything is open, or the failing step
 *                              and its errno and exits 1. With "devonly" it
 *                              then closes the container and group fds and
 *                              keeps only the device fd (the device stays
 *                              open: a device fd holds its group), a holder
 *                              that /proc cannot tie to the device on
 *                              kernels before 6.18
 *   vmtool hotreset GROUP ADDR  like vfiohold up to the device fd, then ask the
 *                              kernel which functions a hot (bus or slot)
 *                              reset of ADDR would reach
 *                              (VFIO_DEVICE_GET_PCI_HOT_RESET_INFO) and print
 *                              one "DDDD:BB:DD.F GROUP" line each, then close
 *                              everything; exits 1 naming the failing step
 *   vmtool hold PATH [ro]      open PATH (read-write, or read-only with "ro")
 *                              and hold it until killed; prints "holding PATH
 *                              pid N fd F", or "open PATH: <errno text>" and
 *                              exits 1 (13 for EACCES/EPERM: a permission
 *                              refusal a test can tell from other failures)
 *   vmtool http SOCKET METHOD PATH [BODY]
 *                              one HTTP/1.1 request to vfiod's Unix socket
 *                              (JSON body if given); like `vfioctl --json`:
 *                              a 2xx answer's body on stdout and exit 0,
 *                              any other on stderr and exit 1 (2: no answer).
 *                              For API fields a scenario needs before vfioctl
 *                              has an option for them. With
 *                              VMTOOL_HTTP_STATUS=FILE in the environment the
 *                              status code is written to FILE.
 *   vmtool runas UID GID GID,GID,.. CMD [ARGS..]
 *                              setgroups+setgid+setuid, then exec CMD
 *   vmtool killongrant PATH UID PID MS
 *                              poll PATH's access ACL (the xattr
 *                              system.posix_acl_access) without pause and
 *                              SIGKILL PID the moment it has an entry for
 *                              UID: a kill that lands between a grant and
 *                              whatever the granter does next. Prints
 *                              "killed PID after N us (P polls)" and exits 0,
 *                              or "no grant in MS ms" and exits 1
 *   vmtool pcistate NAME=ADDR=NATIVE..
 *                              what the kernel says of each PCI function, as
 *                              one JSON object keyed by NAME: {"addr",
 *                              "present", "driver" ("none" without one),
 *                              "native", "group" (null without one),
 *                              "override"}; driver_override is read only
 *                              when the function is on NATIVE (a read blocks
 *                              while an unbind waits in the kernel), else "".
 *                              One process instead of a dozen forks per
 *                              check under TCG (the random walk's checks)
 *   vmtool vfioacls            the named-user entries of the access ACL of
 *                              every /dev/vfio/N, as JSON {"N": [uid, ..]}
 *   vmtool mttywrite PATH VALUE [VALUE..]
 *                              open PATH write-only (no O_CREAT, no O_TRUNC:
 *                              an absent attribute must answer ENOENT) and
 *                              write each VALUE through that one fd as one
 *                              write(2); prints "open OK|ERRNO" and then
 *                              "write OK|ERRNO" per value, with the errno's
 *                              symbolic name, so a scenario can assert the
 *                              kernel's exact answer; exits 0 only if every
 *                              step worked. Only under the mdev sample
 *                              parents /sys/devices/virtual/{mtty,mdpy}/
 *
 * It never writes to PCI sysfs: it reads clocks and netlink, opens VFIO
 * nodes (opening a device fd may reset the function, as it does for a VMM),
 * and writes only the attributes of the mdev sample parents (mttywrite).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/vfio.h>
#include <sys/ioctl.h>
#include <linux/netlink.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <signal.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

static void print_clock(clockid_t c) {
	struct timespec ts;
	clock_gettime(c, &ts);
	printf("%ld.%09ld\n", (long)ts.tv_sec, ts.tv_nsec);
}

/* The header systemd-udevd puts before the properties of a group-2 message
 * (src/libsystemd/sd-device/device-monitor.c). */
struct udev_monitor_header {
	char prefix[8]; /* "libudev" */
	unsigned magic; /* 0xfeedcafe, big endian */
	unsigned header_size, properties_off, properties_len;
	unsigned filter_subsystem_hash, filter_devtype_hash;
	unsigned filter_tag_bloom_hi, filter_tag_bloom_lo;
};

static int uevmon(const char *want_subsys, int udev_group) {
	int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT);
	if (fd < 0) { perror("socket"); return 1; }
	int sz = 4 << 20;
	setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &sz, sizeof sz);
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK, .nl_groups = udev_group ? 2 : 1 };
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("bind"); return 1; }
	setvbuf(stdout, NULL, _IOLBF, 0);
	/* Tell whoever waits for us that the socket is live. */
	fprintf(stderr, "uevmon: listening\n");
	static char buf[16384];
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		if (n <= 0) continue;
		buf[n] = 0;
		char *props = buf, *end = buf + n;
		if (udev_group) {
			struct udev_monitor_header h;
			if ((size_t)n < sizeof h) continue;
			memcpy(&h, buf, sizeof h);
			if (strcmp(h.prefix, "libudev") || h.properties_off >= (unsigned)n) continue;
			props = buf + h.properties_off;
			if (h.properties_off + h.properties_len <= (unsigned)n) end = props + h.properties_len;
		}
		const char *action = "", *devpath = "", *subsys = "", *driver = NULL;
		for (char *p = props; p < end; p += strlen(p) + 1) {
			if (!strncmp(p, "ACTION=", 7)) action = p + 7;
			else if (!strncmp(p, "DEVPATH=", 8)) devpath = p + 8;
			else if (!strncmp(p, "SUBSYSTEM=", 10)) subsys = p + 10;
			else if (!strncmp(p, "DRIVER=", 7)) driver = p + 7;
		}
		if (want_subsys && strcmp(want_subsys, subsys)) continue;
		printf("%ld.%09ld %s %s %s%s\n", (long)ts.tv_sec, ts.tv_nsec, action, devpath,
		       driver ? "DRIVER=" : "", driver ? driver : "");
	}
}

/* Container + group + device fd of ADDR, as a VMM gets them; -1 (after
 * saying which step failed) or 13 for a permission refusal. */
static int vfio_open_device(const char *group, const char *addr, int *container_out, int *group_out) {
	char path[64];
	snprintf(path, sizeof path, "/dev/vfio/%s", group);
	int container = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
	if (container < 0) { perror("/dev/vfio/vfio"); return -1; }
	int g = open(path, O_RDWR | O_CLOEXEC);
	if (g < 0) {
		int e = errno; /* perror may change errno */
		perror(path);
		return (e == EACCES || e == EPERM) ? -13 : -1;
	}
	struct vfio_group_status st = { .argsz = sizeof st };
	if (ioctl(g, VFIO_GROUP_GET_STATUS, &st) < 0) { perror("VFIO_GROUP_GET_STATUS"); return -1; }
	if (!(st.flags & VFIO_GROUP_FLAGS_VIABLE)) { fprintf(stderr, "group %s is not viable\n", group); return -1; }
	if (ioctl(g, VFIO_GROUP_SET_CONTAINER, &container) < 0) { perror("VFIO_GROUP_SET_CONTAINER"); return -1; }
	if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0) { perror("VFIO_SET_IOMMU"); return -1; }
	int dev = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, addr);
	if (dev < 0) { perror("VFIO_GROUP_GET_DEVICE_FD"); return -1; }
	*container_out = container;
	*group_out = g;
	return dev;
}

static int hotreset(const char *group, const char *addr) {
	int container, g;
	int dev = vfio_open_device(group, addr, &container, &g);
	if (dev < 0) return dev == -13 ? 13 : 1;
	/* First call with no room: the kernel answers ENOSPC and the count. */
	struct vfio_pci_hot_reset_info probe = { .argsz = sizeof probe };
	if (ioctl(dev, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, &probe) < 0 && errno != ENOSPC) {
		perror("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO");
		return 1;
	}
	size_t size = sizeof probe + probe.count * sizeof(struct vfio_pci_dependent_device);
	struct vfio_pci_hot_reset_info *info = calloc(1, size);
	info->argsz = size;
	if (ioctl(dev, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, info) < 0) { perror("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"); return 1; }
	for (unsigned i = 0; i < info->count; i++) {
		struct vfio_pci_dependent_device *d = &info->devices[i];
		printf("%04x:%02x:%02x.%x %u\n", d->segment, d->bus, d->devfn >> 3, d->devfn & 7, d->group_id);
	}
	close(dev);
	close(g);
	close(container);
	return 0;
}

static int vfiohold(const char *group, const char *addr, int device_only) {
	int container, g;
	int dev = vfio_open_device(group, addr, &container, &g);
	if (dev < 0) return dev == -13 ? 13 : 1;
	if (device_only) {
		close(g);
		close(container);
		printf("holding %s in group %s pid %d fd %d (device only)\n", addr, group, (int)getpid(), dev);
		fflush(stdout);
		for (;;) pause();
	}
	printf("holding %s in group %s pid %d fds %d %d %d\n", addr, group, (int)getpid(), container, g, dev);
	fflush(stdout);
	for (;;) pause();
}

static int hold(const char *path, int readonly) {
	int fd = open(path, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (fd < 0) {
		int e = errno;
		printf("open %s: %s\n", path, strerror(e));
		fflush(stdout);
		return (e == EACCES || e == EPERM) ? 13 : 1;
	}
	printf("holding %s pid %d fd %d\n", path, (int)getpid(), fd);
	fflush(stdout);
	for (;;) pause();
}

static int http(const char *sock, const char *method, const char *path, const char *body) {
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", sock);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) { perror(sock); return 2; }
	size_t blen = body ? strlen(body) : 0;
	char head[1024];
	int hlen = snprintf(head, sizeof head,
			    "%s %s HTTP/1.1\r\nHost: vfiod\r\nConnection: close\r\n%s"
			    "Content-Length: %zu\r\n\r\n",
			    method, path, body ? "Content-Type: application/json\r\n" : "", blen);
	if (write(fd, head, hlen) != hlen || (blen && write(fd, body, blen) != (ssize_t)blen)) { perror("write"); return 2; }
	static char buf[1 << 20];
	size_t n = 0;
	for (ssize_t r; n < sizeof buf - 1 && (r = read(fd, buf + n, sizeof buf - 1 - n)) > 0;) n += r;
	buf[n] = 0;
	int status = 0;
	char *p = strstr(buf, "\r\n\r\n");
	if (sscanf(buf, "HTTP/1.%*d %d", &status) != 1 || !p) { fprintf(stderr, "no HTTP answer: %s\n", buf); return 2; }
	*p = 0;
	char *payload = p + 4;
	const char *status_file = getenv("VMTOOL_HTTP_STATUS");
	if (status_file) {
		FILE *sf = fopen(status_file, "w");
		if (sf) { fprintf(sf, "%d\n", status); fclose(sf); }
	}
	/* Chunked answers: join the chunks in place. */
	if (strcasestr(buf, "transfer-encoding: chunked")) {
		char *in = payload, *out = payload;
		for (;;) {
			unsigned long len = strtoul(in, &in, 16);
			in = strstr(in, "\r\n");
			if (!len || !in) break;
			in += 2;
			memmove(out, in, len);
			out += len;
			in += len + 2;
		}
		*out = 0;
	}
	FILE *to = status >= 200 && status < 300 ? stdout : stderr;
	fprintf(to, "%s\n", payload);
	return to == stdout ? 0 : 1;
}

static double mono_us(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

/* Whether the POSIX ACL xattr value in BUF (version 2: a u32 header, then
 * entries of u16 tag, u16 perm, u32 id) has an ACL_USER entry for UID. */
static int acl_names_user(const unsigned char *buf, ssize_t n, uint32_t uid) {
	for (ssize_t off = 4; off + 8 <= n; off += 8) {
		uint16_t tag;
		uint32_t id;
		memcpy(&tag, buf + off, 2);
		memcpy(&id, buf + off + 4, 4);
		if (tag == 0x02 /* ACL_USER */ && id == uid) return 1;
	}
	return 0;
}

static int killongrant(const char *path, uint32_t uid, pid_t pid, long ms) {
	unsigned char buf[1024];
	double start = mono_us();
	long polls = 0;
	while (mono_us() - start < ms * 1000.0) {
		polls++;
		ssize_t n = getxattr(path, "system.posix_acl_access", buf, sizeof buf);
		if (n > 0 && acl_names_user(buf, n, uid)) {
			kill(pid, SIGKILL);
			printf("killed %d after %.0f us (%ld polls)\n", (int)pid, mono_us() - start, polls);
			return 0;
		}
	}
	printf("no grant in %ld ms (%ld polls)\n", ms, polls);
	return 1;
}

/* The last path component of the symlink PATH into OUT ("" if none). */
static void link_base(const char *path, char *out, size_t len) {
	char buf[4096];
	ssize_t n = readlink(path, buf, sizeof buf - 1);
	out[0] = 0;
	if (n <= 0) return;
	buf[n] = 0;
	const char *b = strrchr(buf, '/');
	b = b ? b + 1 : buf;
	size_t l = strlen(b) < len ? strlen(b) : len - 1;
	memcpy(out, b, l);
	out[l] = 0;
}

static int pcistate(int argc, char **argv) {
	printf("{");
	for (int i = 0; i < argc; i++) {
		char spec[256], path[512], drv[256], grp[64], ovr[256] = "";
		snprintf(spec, sizeof spec, "%s", argv[i]);
		char *addr = strchr(spec, '=');
		char *native = addr ? strchr(addr + 1, '=') : NULL;
		if (!addr || !native) { fprintf(stderr, "pcistate: NAME=ADDR=NATIVE, not %s\n", argv[i]); return 2; }
		*addr++ = 0;
		*native++ = 0;
		snprintf(path, sizeof path, "/sys/bus/pci/devices/%s", addr);
		int present = access(path, F_OK) == 0;
		snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver", addr);
		link_base(path, drv, sizeof drv);
		if (!drv[0]) snprintf(drv, sizeof drv, "none");
		snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/iommu_group", addr);
		link_base(path, grp, sizeof grp);
		if (present && !strcmp(drv, native)) {
			snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver_override", addr);
			int fd = open(path, O_RDONLY | O_CLOEXEC);
			if (fd >= 0) {
				ssize_t n = read(fd, ovr, sizeof ovr - 1);
				ovr[n > 0 ? n : 0] = 0;
				close(fd);
				ovr[strcspn(ovr, "\n")] = 0;
				if (!strcmp(ovr, "(null)")) ovr[0] = 0;
			}
		}
		printf("%s\"%s\": {\"addr\": \"%s\", \"present\": %s, \"driver\": \"%s\", \"native\": \"%s\", \"group\": %s, \"override\": \"%s\"}",
		       i ? ", " : "", spec, addr, present ? "true" : "false", present ? drv : "none", native,
		       present && grp[0] ? grp : "null", ovr);
	}
	printf("}\n");
	return 0;
}

static int vfioacls(void) {
	DIR *d = opendir("/dev/vfio");
	int first = 1;
	printf("{");
	for (struct dirent *e; d && (e = readdir(d));) {
		if (!e->d_name[0] || strspn(e->d_name, "0123456789") != strlen(e->d_name)) continue;
		char path[300];
		unsigned char buf[1024];
		snprintf(path, sizeof path, "/dev/vfio/%s", e->d_name);
		ssize_t n = getxattr(path, "system.posix_acl_access", buf, sizeof buf);
		printf("%s\"%s\": [", first ? "" : ", ", e->d_name);
		first = 0;
		int one = 0;
		for (ssize_t off = 4; n > 0 && off + 8 <= n; off += 8) {
			uint16_t tag;
			uint32_t id;
			memcpy(&tag, buf + off, 2);
			memcpy(&id, buf + off + 4, 4);
			if (tag == 0x02 /* ACL_USER */) printf("%s%u", one++ ? ", " : "", id);
		}
		printf("]");
	}
	if (d) closedir(d);
	printf("}\n");
	return 0;
}

static const char *errno_name(int e) {
	static const struct { int e; const char *name; } names[] = {
		{ EPERM, "EPERM" }, { ENOENT, "ENOENT" }, { EIO, "EIO" }, { ENXIO, "ENXIO" },
		{ EAGAIN, "EAGAIN" }, { ENOMEM, "ENOMEM" }, { EACCES, "EACCES" }, { EBUSY, "EBUSY" },
		{ EEXIST, "EEXIST" }, { ENODEV, "ENODEV" }, { ENOTDIR, "ENOTDIR" }, { EINVAL, "EINVAL" },
		{ ENOSPC, "ENOSPC" }, { ERANGE, "ERANGE" }, { EUSERS, "EUSERS" }, { ENOTSUP, "ENOTSUP" },
		{ EINTR, "EINTR" }, { EFAULT, "EFAULT" }, { ENODATA, "ENODATA" }, { E2BIG, "E2BIG" },
	};
	static char other[32];
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
		if (names[i].e == e) return names[i].name;
	snprintf(other, sizeof other, "errno%d", e);
	return other;
}

static int mttywrite(const char *path, int nvalues, char **values) {
	static const char mtty[] = "/sys/devices/virtual/mtty/", mdpy[] = "/sys/devices/virtual/mdpy/";
	if ((strncmp(path, mtty, sizeof mtty - 1) && strncmp(path, mdpy, sizeof mdpy - 1)) || strstr(path, "/..")) {
		fprintf(stderr, "mttywrite: %s is not under %s or %s\n", path, mtty, mdpy);
		return 2;
	}
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		printf("open %s\n", errno_name(errno));
		return 1;
	}
	printf("open OK\n");
	fflush(stdout);
	int rc = 0;
	for (int i = 0; i < nvalues; i++) {
		if (write(fd, values[i], strlen(values[i])) < 0) {
			printf("write %s\n", errno_name(errno));
			rc = 1;
		} else {
			printf("write OK\n");
		}
		fflush(stdout);
	}
	close(fd);
	return rc;
}

int main(int argc, char **argv) {
	if (argc >= 4 && !strcmp(argv[1], "vfiohold")) return vfiohold(argv[2], argv[3], argc >= 5 && !strcmp(argv[4], "devonly"));
	if (argc >= 4 && !strcmp(argv[1], "hotreset")) return hotreset(argv[2], argv[3]);
	if (argc >= 5 && !strcmp(argv[1], "http")) return http(argv[2], argv[3], argv[4], argc >= 6 ? argv[5] : NULL);
	if (argc >= 6 && !strcmp(argv[1], "killongrant"))
		return killongrant(argv[2], (uint32_t)strtoul(argv[3], NULL, 10), (pid_t)atoi(argv[4]), atol(argv[5]));
	if (argc >= 3 && !strcmp(argv[1], "hold")) return hold(argv[2], argc >= 4 && !strcmp(argv[3], "ro"));
	if (argc >= 2 && !strcmp(argv[1], "pcistate")) return pcistate(argc - 2, argv + 2);
	if (argc >= 2 && !strcmp(argv[1], "vfioacls")) return vfioacls();
	if (argc >= 4 && !strcmp(argv[1], "mttywrite")) return mttywrite(argv[2], argc - 3, argv + 3);
	if (argc >= 2 && !strcmp(argv[1], "now")) { print_clock(CLOCK_REALTIME); return 0; }
	if (argc >= 2 && !strcmp(argv[1], "mono")) { print_clock(CLOCK_MONOTONIC); return 0; }
	if (argc >= 2 && !strcmp(argv[1], "uevmon")) return uevmon(argc >= 3 ? argv[2] : NULL, argc >= 4 && !strcmp(argv[3], "udev"));
	if (argc >= 6 && !strcmp(argv[1], "runas")) {
		uid_t uid = (uid_t)atoi(argv[2]);
		gid_t gid = (gid_t)atoi(argv[3]);
		gid_t groups[64];
		int ng = 0;
		char *s = strdup(argv[4]);
		for (char *t = strtok(s, ","); t && ng < 64; t = strtok(NULL, ","))
			if (*t && strcmp(t, "-")) groups[ng++] = (gid_t)atoi(t);
		if (setgroups(ng, groups) || setgid(gid) || setuid(uid)) { perror("runas"); return 126; }
		execvp(argv[5], argv + 5);
		perror("exec");
		return 127;
	}
	fprintf(stderr, "usage: vmtool now|mono|uevmon [SUBSYSTEM [udev]]|vfiohold GROUP ADDR|hotreset GROUP ADDR|hold PATH [ro]|http SOCK METHOD PATH [BODY]|runas UID GID G1,G2 CMD..|killongrant PATH UID PID MS|pcistate NAME=ADDR=NATIVE..|vfioacls|mttywrite PATH VALUE..\n");
	return 2;
}
