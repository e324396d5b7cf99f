/*
 * vfsprobe: run exactly one file-system syscall (or a short, fixed sequence)
 * from a guest shell, so that conformance tests can drive the syscalls that
 * busybox has no applet for (renameat2, fallocate modes, copy_file_range,
 * SEEK_DATA/SEEK_HOLE, O_TMPFILE, statx, POSIX/OFD locks, flock, xattrs,
 * FS_IOC_GETFLAGS, syncfs, utimensat with UTIME_NOW/UTIME_OMIT, ...).
 *
 * Built statically on the host (gcc -static) and shipped in the guest image.
 *
 * Output contract: on success, prints the result (or "ok") and exits 0; when
 * the syscall fails, prints the errno's symbolic name (e.g. "EEXIST") on
 * stdout and exits 1; a usage error exits 2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

static int fail(void)
{
	const char *name = strerrorname_np(errno);
	printf("%s\n", name ? name : "E?");
	return 1;
}

static void usage(const char *why)
{
	fprintf(stderr, "vfsprobe: %s\n", why);
	exit(2);
}

static long long num(const char *s)
{
	char *end;
	long long v = strtoll(s, &end, 0);
	if (*s == '\0' || *end != '\0')
		usage("bad number");
	return v;
}

static int open_flags(const char *spec)
{
	static const struct { const char *name; int flag; } table[] = {
		{"rdonly", O_RDONLY}, {"wronly", O_WRONLY}, {"rdwr", O_RDWR},
		{"creat", O_CREAT}, {"excl", O_EXCL}, {"trunc", O_TRUNC},
		{"append", O_APPEND}, {"tmpfile", O_TMPFILE}, {"directory", O_DIRECTORY},
		{"nofollow", O_NOFOLLOW}, {"sync", O_SYNC}, {"dsync", O_DSYNC},
		{"noatime", O_NOATIME}, {"path", O_PATH}, {"direct", O_DIRECT},
	};
	int flags = 0;
	char *copy = strdup(spec), *save = NULL;
	for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		size_t i;
		for (i = 0; i < sizeof(table) / sizeof(table[0]); i++)
			if (strcmp(tok, table[i].name) == 0)
				break;
		if (i == sizeof(table) / sizeof(table[0]))
			usage("unknown open flag");
		flags |= table[i].flag;
	}
	free(copy);
	return flags;
}

/* Wait until `path` exists (a guest-local flag file the test creates). */
static void wait_for(const char *path)
{
	while (access(path, F_OK) != 0)
		poll(NULL, 0, 10);
}

static int say_ok(void)
{
	printf("ok\n");
	return 0;
}

/* open PATH FLAGS [MODE]: open and close. */
static int cmd_open(char **a)
{
	int fd = open(a[0], open_flags(a[1]), a[2] ? (mode_t)num(a[2]) : 0644);
	if (fd < 0)
		return fail();
	close(fd);
	return say_ok();
}

/* write PATH FLAGS OFFSET|-1 DATA: one write (pwrite unless OFFSET is -1). */
static int cmd_write(char **a)
{
	int fd = open(a[0], open_flags(a[1]), 0644);
	if (fd < 0)
		return fail();
	long long off = num(a[2]);
	size_t len = strlen(a[3]);
	ssize_t n = off < 0 ? write(fd, a[3], len) : pwrite(fd, a[3], len, off);
	if (n < 0)
		return fail();
	off_t pos = lseek(fd, 0, SEEK_CUR);
	close(fd);
	printf("%zd %lld\n", n, (long long)pos);
	return 0;
}

/* rename2 OLD NEW none|noreplace|exchange */
static int cmd_rename2(char **a)
{
	unsigned flags = 0;
	if (strcmp(a[2], "noreplace") == 0)
		flags = RENAME_NOREPLACE;
	else if (strcmp(a[2], "exchange") == 0)
		flags = RENAME_EXCHANGE;
	else if (strcmp(a[2], "none") != 0)
		usage("rename2 flag");
	if (renameat2(AT_FDCWD, a[0], AT_FDCWD, a[1], flags) < 0)
		return fail();
	return say_ok();
}

/* fallocate PATH alloc|keep|punch|zero|zerokeep OFFSET LEN */
static int cmd_fallocate(char **a)
{
	int mode;
	if (strcmp(a[1], "alloc") == 0)
		mode = 0;
	else if (strcmp(a[1], "keep") == 0)
		mode = FALLOC_FL_KEEP_SIZE;
	else if (strcmp(a[1], "punch") == 0)
		mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
	else if (strcmp(a[1], "zero") == 0)
		mode = FALLOC_FL_ZERO_RANGE;
	else if (strcmp(a[1], "zerokeep") == 0)
		mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
	else
		usage("fallocate mode");
	int fd = open(a[0], O_RDWR);
	if (fd < 0 || fallocate(fd, mode, num(a[2]), num(a[3])) < 0)
		return fail();
	close(fd);
	return say_ok();
}

/* copyrange SRC DST SRCOFF DSTOFF LEN: loops until LEN bytes or EOF. */
static int cmd_copyrange(char **a)
{
	int in = open(a[0], O_RDONLY), out = open(a[1], O_WRONLY | O_CREAT, 0644);
	if (in < 0 || out < 0)
		return fail();
	loff_t sin = num(a[2]), sout = num(a[3]);
	long long left = num(a[4]), total = 0;
	while (left > 0) {
		ssize_t n = copy_file_range(in, &sin, out, &sout, left, 0);
		if (n < 0)
			return fail();
		if (n == 0)
			break;
		left -= n;
		total += n;
	}
	printf("%lld\n", total);
	return 0;
}

/* seek PATH data|hole OFFSET: the resulting offset. */
static int cmd_seek(char **a)
{
	int fd = open(a[0], O_RDONLY);
	if (fd < 0)
		return fail();
	int whence = strcmp(a[1], "data") == 0 ? SEEK_DATA : SEEK_HOLE;
	off_t r = lseek(fd, num(a[2]), whence);
	if (r < 0)
		return fail();
	printf("%lld\n", (long long)r);
	return 0;
}

/* tmpfile DIR DATA [LINKNAME]: O_TMPFILE, write, print nlink, link it in. */
static int cmd_tmpfile(char **a)
{
	int fd = open(a[0], O_TMPFILE | O_RDWR, 0640);
	if (fd < 0)
		return fail();
	if (write(fd, a[1], strlen(a[1])) < 0)
		return fail();
	struct stat st;
	if (fstat(fd, &st) < 0)
		return fail();
	if (a[2]) {
		char proc[64];
		snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
		if (linkat(AT_FDCWD, proc, AT_FDCWD, a[2], AT_SYMLINK_FOLLOW) < 0)
			return fail();
	}
	printf("%lu\n", (unsigned long)st.st_nlink);
	return 0;
}

/* statx PATH: the basic fields plus the mask the file system filled. */
static int cmd_statx(char **a)
{
	struct statx sx;
	if (statx(AT_FDCWD, a[0], AT_SYMLINK_NOFOLLOW, STATX_BASIC_STATS | STATX_BTIME, &sx) < 0)
		return fail();
	printf("mask=%#x mode=%o nlink=%u uid=%u gid=%u size=%llu blocks=%llu ino=%llu "
	       "mtime=%lld.%09u btime=%lld.%09u\n",
	       sx.stx_mask, sx.stx_mode, sx.stx_nlink, sx.stx_uid, sx.stx_gid,
	       (unsigned long long)sx.stx_size, (unsigned long long)sx.stx_blocks,
	       (unsigned long long)sx.stx_ino, (long long)sx.stx_mtime.tv_sec,
	       sx.stx_mtime.tv_nsec, (long long)sx.stx_btime.tv_sec, sx.stx_btime.tv_nsec);
	return 0;
}

/*
 * lock PATH r|w|u setlk|setlkw|getlk|ofd_setlk|ofd_setlkw|ofd_getlk START LEN [RELEASEFILE]
 * With RELEASEFILE: print "locked", then hold the lock until that file exists.
 * getlk prints "unlck" or "TYPE START LEN PID".
 */
static int cmd_lock(char **a)
{
	static const struct { const char *name; int cmd; } cmds[] = {
		{"setlk", F_SETLK}, {"setlkw", F_SETLKW}, {"getlk", F_GETLK},
		{"ofd_setlk", F_OFD_SETLK}, {"ofd_setlkw", F_OFD_SETLKW}, {"ofd_getlk", F_OFD_GETLK},
	};
	int cmd = -1;
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		if (strcmp(a[2], cmds[i].name) == 0)
			cmd = cmds[i].cmd;
	if (cmd < 0)
		usage("lock command");
	struct flock fl = {0};
	fl.l_type = a[1][0] == 'r' ? F_RDLCK : a[1][0] == 'w' ? F_WRLCK : F_UNLCK;
	fl.l_whence = SEEK_SET;
	fl.l_start = num(a[3]);
	fl.l_len = num(a[4]);
	int fd = open(a[0], fl.l_type == F_WRLCK ? O_RDWR : O_RDONLY);
	if (fd < 0 || fcntl(fd, cmd, &fl) < 0)
		return fail();
	if (cmd == F_GETLK || cmd == F_OFD_GETLK) {
		if (fl.l_type == F_UNLCK)
			printf("unlck\n");
		else
			printf("%s %lld %lld %d\n", fl.l_type == F_RDLCK ? "r" : "w",
			       (long long)fl.l_start, (long long)fl.l_len, (int)fl.l_pid);
		return 0;
	}
	printf("locked\n");
	fflush(stdout);
	if (a[5])
		wait_for(a[5]);
	return 0;
}

/* flock PATH sh|ex|un block|nb [RELEASEFILE] */
static int cmd_flock(char **a)
{
	int op = strcmp(a[1], "sh") == 0 ? LOCK_SH : strcmp(a[1], "ex") == 0 ? LOCK_EX : LOCK_UN;
	if (strcmp(a[2], "nb") == 0)
		op |= LOCK_NB;
	int fd = open(a[0], O_RDONLY);
	if (fd < 0 || flock(fd, op) < 0)
		return fail();
	printf("locked\n");
	fflush(stdout);
	if (a[3])
		wait_for(a[3]);
	return 0;
}

/* xattr set|get|list|remove PATH [NAME [VALUE [create|replace]]] */
static int cmd_xattr(char **a)
{
	char buf[65536];
	if (strcmp(a[0], "set") == 0) {
		int flags = 0;
		if (a[4])
			flags = strcmp(a[4], "create") == 0 ? XATTR_CREATE : XATTR_REPLACE;
		if (lsetxattr(a[1], a[2], a[3], strlen(a[3]), flags) < 0)
			return fail();
		return say_ok();
	}
	if (strcmp(a[0], "get") == 0) {
		ssize_t n = lgetxattr(a[1], a[2], buf, sizeof(buf));
		if (n < 0)
			return fail();
		printf("%.*s\n", (int)n, buf);
		return 0;
	}
	if (strcmp(a[0], "list") == 0) {
		ssize_t n = llistxattr(a[1], buf, sizeof(buf));
		if (n < 0)
			return fail();
		for (ssize_t i = 0; i < n; i += strlen(buf + i) + 1)
			printf("%s\n", buf + i);
		return 0;
	}
	if (strcmp(a[0], "remove") == 0) {
		if (lremovexattr(a[1], a[2]) < 0)
			return fail();
		return say_ok();
	}
	usage("xattr op");
	return 2;
}

/* getflags PATH: FS_IOC_GETFLAGS in hex. */
static int cmd_getflags(char **a)
{
	int fd = open(a[0], O_RDONLY | O_NONBLOCK), flags = 0;
	if (fd < 0 || ioctl(fd, FS_IOC_GETFLAGS, &flags) < 0)
		return fail();
	printf("%#x\n", flags);
	return 0;
}

/* sync fsync|fdatasync|syncfs PATH */
static int cmd_sync(char **a)
{
	int fd = open(a[1], O_RDONLY);
	if (fd < 0)
		return fail();
	int r = strcmp(a[0], "fsync") == 0 ? fsync(fd)
	      : strcmp(a[0], "fdatasync") == 0 ? fdatasync(fd)
	      : syncfs(fd);
	if (r < 0)
		return fail();
	return say_ok();
}

static struct timespec ts_arg(const char *s)
{
	struct timespec ts = {0, 0};
	if (strcmp(s, "now") == 0)
		ts.tv_nsec = UTIME_NOW;
	else if (strcmp(s, "omit") == 0)
		ts.tv_nsec = UTIME_OMIT;
	else {
		char *dot = strchr(s, '.');
		ts.tv_sec = strtoll(s, NULL, 10);
		/* The fraction's digits, as nanoseconds: ".5" is 500000000. */
		long scale = 100000000;
		for (const char *p = dot ? dot + 1 : ""; *p >= '0' && *p <= '9' && scale; p++) {
			ts.tv_nsec += (*p - '0') * scale;
			scale /= 10;
		}
	}
	return ts;
}

/* utimens PATH ATIME MTIME [nofollow]: each "now", "omit" or SEC[.NSEC]. */
static int cmd_utimens(char **a)
{
	struct timespec ts[2] = {ts_arg(a[1]), ts_arg(a[2])};
	int flags = a[3] && strcmp(a[3], "nofollow") == 0 ? AT_SYMLINK_NOFOLLOW : 0;
	if (utimensat(AT_FDCWD, a[0], ts, flags) < 0)
		return fail();
	return say_ok();
}

/* mknod PATH fifo|sock|chr|blk MODE [MAJOR MINOR] */
static int cmd_mknod(char **a)
{
	mode_t type = strcmp(a[1], "fifo") == 0 ? S_IFIFO
		    : strcmp(a[1], "sock") == 0 ? S_IFSOCK
		    : strcmp(a[1], "chr") == 0 ? S_IFCHR : S_IFBLK;
	dev_t dev = a[3] && a[4] ? makedev(num(a[3]), num(a[4])) : 0;
	if (mknod(a[0], type | (mode_t)num(a[2]), dev) < 0)
		return fail();
	return say_ok();
}

/* bindsock PATH: create a unix socket node by bind(2). */
static int cmd_bindsock(char **a)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", a[0]);
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	if (s < 0 || bind(s, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return fail();
	return say_ok();
}

/* ftruncate PATH LEN */
static int cmd_ftruncate(char **a)
{
	int fd = open(a[0], O_WRONLY);
	if (fd < 0 || ftruncate(fd, num(a[1])) < 0)
		return fail();
	return say_ok();
}

/* unlinked PATH DATA: open, unlink, then write and read through the fd. */
static int cmd_unlinked(char **a)
{
	char buf[4096];
	int fd = open(a[0], O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || unlink(a[0]) < 0)
		return fail();
	size_t len = strlen(a[1]);
	if (pwrite(fd, a[1], len, 0) < 0)
		return fail();
	ssize_t n = pread(fd, buf, sizeof(buf), 0);
	if (n < 0)
		return fail();
	struct stat st;
	if (fstat(fd, &st) < 0)
		return fail();
	printf("%lu %.*s\n", (unsigned long)st.st_nlink, (int)n, buf);
	return 0;
}

/* statfs PATH */
static int cmd_statfs(char **a)
{
	struct statfs sf;
	if (statfs(a[0], &sf) < 0)
		return fail();
	printf("type=%#lx bsize=%ld blocks=%llu bfree=%llu bavail=%llu files=%llu ffree=%llu "
	       "namelen=%ld frsize=%ld\n",
	       (unsigned long)sf.f_type, (long)sf.f_bsize, (unsigned long long)sf.f_blocks,
	       (unsigned long long)sf.f_bfree, (unsigned long long)sf.f_bavail,
	       (unsigned long long)sf.f_files, (unsigned long long)sf.f_ffree,
	       (long)sf.f_namelen, (long)sf.f_frsize);
	return 0;
}

/* asuser UID GID CMD ARGS...: drop to UID/GID (no supplementary groups) and exec. */
static int cmd_asuser(char **a)
{
	gid_t gid = (gid_t)num(a[1]);
	if (setgroups(0, NULL) < 0 || setresgid(gid, gid, gid) < 0)
		return fail();
	if (setresuid((uid_t)num(a[0]), (uid_t)num(a[0]), (uid_t)num(a[0])) < 0)
		return fail();
	execvp(a[2], a + 2);
	return fail();
}

static const struct {
	const char *name;
	int nargs;
	int (*fn)(char **);
} commands[] = {
	{"open", 2, cmd_open}, {"write", 4, cmd_write}, {"rename2", 3, cmd_rename2},
	{"fallocate", 4, cmd_fallocate}, {"copyrange", 5, cmd_copyrange},
	{"seek", 3, cmd_seek}, {"tmpfile", 2, cmd_tmpfile}, {"statx", 1, cmd_statx},
	{"lock", 5, cmd_lock}, {"flock", 3, cmd_flock}, {"xattr", 2, cmd_xattr},
	{"getflags", 1, cmd_getflags}, {"sync", 2, cmd_sync}, {"utimens", 3, cmd_utimens},
	{"mknod", 3, cmd_mknod}, {"bindsock", 1, cmd_bindsock},
	{"ftruncate", 2, cmd_ftruncate}, {"unlinked", 2, cmd_unlinked},
	{"statfs", 1, cmd_statfs}, {"asuser", 3, cmd_asuser},
};

int main(int argc, char **argv)
{
	if (argc < 2)
		usage("usage: vfsprobe COMMAND ARGS...");
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (strcmp(argv[1], commands[i].name) != 0)
			continue;
		if (argc - 2 < commands[i].nargs)
			usage("too few arguments");
		setvbuf(stdout, NULL, _IOLBF, 0);
		return commands[i].fn(argv + 2);
	}
	usage("unknown command");
	return 2;
}
