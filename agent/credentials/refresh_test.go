package credentials

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// pass is what the agent does with its keyring at each pass: Refresh, then a
// lookup per image it pulls.
func pass(t *testing.T, k *Keyring, images ...string) {
	t.Helper()
	k.Refresh()
	for _, img := range images {
		if _, err := k.Lookup(context.Background(), img); err != nil {
			t.Fatalf("Lookup(%s): %v", img, err)
		}
	}
}

// One keyring across passes: a plugin answer is reused for as long as its
// cacheDuration (here 1h) and by its cacheKeyType: Registry and Global serve
// two images of one registry with one run, Image does not.
func TestKeyringCachesPluginAnswersAcrossPasses(t *testing.T) {
	t.Parallel()
	const a, b = "registry.test/team/a:1", "registry.test/team/b:1"
	for _, tc := range []struct {
		cacheKey string
		want     int // runs within the hour
	}{
		{"Registry", 1},
		{"Global", 1},
		{"Image", 2},
	} {
		t.Run(tc.cacheKey, func(t *testing.T) {
			cfg, bin, count := pluginSetup(t, configYAML(providerYAML("p", `"registry.test"`, "1m", map[string]string{
				"PLUGIN_CACHE_KEY": tc.cacheKey, "PLUGIN_CACHE_DURATION": "1h", "PLUGIN_PASSWORD": "x",
			})), "p")
			clock := newFakeClock()
			k := NewKeyring(nil, cfg, bin, WithClock(clock))
			if p := k.Problems(); len(p) != 0 {
				t.Fatal(p)
			}
			// 13 passes 5 minutes apart: the last one exactly at 1h, which the
			// answer still serves.
			for i := range 13 {
				if i > 0 {
					clock.Step(5 * time.Minute)
				}
				pass(t, k, a, b)
			}
			if n := len(runs(t, count)); n != tc.want {
				t.Fatalf("13 passes within the cacheDuration ran the plugin %d times, want %d", n, tc.want)
			}
			clock.Step(time.Second)
			pass(t, k, a, b)
			if n := len(runs(t, count)); n != 2*tc.want {
				t.Errorf("after the cacheDuration: %d runs, want %d", n, 2*tc.want)
			}
		})
	}
}

// TestPluginRunsPerHour measures how often a plugin runs with the agent's
// pass schedule, with the fake clock over simulated time. The plugin answers
// for its registry (cacheKeyType Registry) with a cacheDuration of 12h; each
// pass looks up two images of that registry. Two schedules:
//   - steady: a pass every 5 minutes (the default --recheck-interval), each
//     pulling (an image the node keeps losing, say to image GC);
//   - failing: an image that fails every pass, so that the agent retries
//     after 10s, doubling up to the interval (app's nextWait): passes at 0,
//     10s, 30s, 70s, 150s, 310s, then every 5 minutes.
//
// Before (a keyring built per pass, as the agent did): every pass runs the
// plugin, 12 runs in the steady hour and 16 in the failing one. After (one
// keyring, Refresh per pass): 1 run in the first hour, then none until the
// answer expires: 2 runs in 24h.
func TestPluginRunsPerHour(t *testing.T) {
	t.Parallel()
	steady := func(horizon time.Duration) []time.Duration {
		var at []time.Duration
		for d := time.Duration(0); d < horizon; d += 5 * time.Minute {
			at = append(at, d)
		}
		return at
	}
	failing := func(horizon time.Duration) []time.Duration {
		var at []time.Duration
		for d, wait := time.Duration(0), 10*time.Second; d < horizon; d, wait = d+wait, min(2*wait, 5*time.Minute) {
			at = append(at, d)
		}
		return at
	}
	// measure returns the plugin runs over the schedule, with a keyring per
	// pass (perPass) or one for all.
	measure := func(t *testing.T, schedule []time.Duration, perPass bool) int {
		cfg, bin, count := pluginSetup(t, configYAML(providerYAML("p", `"registry.test"`, "1m", map[string]string{
			"PLUGIN_CACHE_KEY": "Registry", "PLUGIN_CACHE_DURATION": "12h", "PLUGIN_PASSWORD": "x",
		})), "p")
		clock := newFakeClock()
		start := clock.Now()
		var k *Keyring
		for _, at := range schedule {
			clock.SetTime(start.Add(at))
			if k == nil || perPass {
				k = NewKeyring(nil, cfg, bin, WithClock(clock))
			}
			pass(t, k, "registry.test/team/a:1", "registry.test/team/b:1")
		}
		return len(runs(t, count))
	}
	hour := time.Hour
	if got := failing(hour); fmt.Sprint(got[:7]) != "[0s 10s 30s 1m10s 2m30s 5m10s 10m10s]" || len(got) != 16 {
		t.Fatalf("failing schedule = %v (%d passes)", got, len(got))
	}
	results := map[string][2]int{}
	for name, schedule := range map[string][]time.Duration{"steady": steady(hour), "failing": failing(hour)} {
		before, after := measure(t, schedule, true), measure(t, schedule, false)
		results[name] = [2]int{before, after}
		t.Logf("%s hour, %d passes: plugin runs before (keyring per pass) %d, after (one keyring) %d", name, len(schedule), before, after)
		if before != len(schedule) || after != 1 {
			t.Errorf("%s: %d runs before, %d after; want %d and 1", name, before, after, len(schedule))
		}
	}
	if results["steady"][0] != 12 || results["failing"][0] != 16 {
		t.Errorf("before: %v, want 12 steady and 16 failing", results)
	}
	day := measure(t, steady(24*time.Hour), false)
	t.Logf("steady day, one keyring: %d plugin runs in 24h", day)
	if day != 2 {
		t.Errorf("one keyring over 24h: %d runs, want 2 (at 0 and once the 12h answer expired)", day)
	}
}

// atomicDir writes a mounted Secret's file the way the kubelet does: the
// content in a new timestamped directory, ..data swung to it by a rename, and
// the file's path a symlink through ..data that never changes.
type atomicDir struct {
	t   *testing.T
	dir string
	gen int
}

func (a *atomicDir) write(name, content string, mtime time.Time) {
	a.t.Helper()
	a.gen++
	ts := filepath.Join(a.dir, fmt.Sprintf("..2026_01_01_00_00_0%d", a.gen))
	p := writeFile(a.t, ts, name, content)
	if err := os.Chtimes(p, mtime, mtime); err != nil {
		a.t.Fatal(err)
	}
	tmp := filepath.Join(a.dir, "..data_tmp")
	if err := os.Symlink(filepath.Base(ts), tmp); err != nil {
		a.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(a.dir, "..data")); err != nil {
		a.t.Fatal(err)
	}
	link := filepath.Join(a.dir, name)
	if _, err := os.Lstat(link); os.IsNotExist(err) {
		if err := os.Symlink(filepath.Join("..data", name), link); err != nil {
			a.t.Fatal(err)
		}
	}
	if a.gen > 1 {
		os.RemoveAll(filepath.Join(a.dir, fmt.Sprintf("..2026_01_01_00_00_0%d", a.gen-1)))
	}
}

func lookupUser(t *testing.T, k *Keyring, image string) string {
	t.Helper()
	creds, err := k.Lookup(context.Background(), image)
	if err != nil {
		t.Fatal(err)
	}
	if len(creds) == 0 {
		return ""
	}
	return creds[0].Auth.Username
}

// A rotated pull secret is used at the next Refresh even when the new file
// has the old one's size and mtime; an unchanged file is not parsed again; a
// file that goes away is reported and comes back when it returns.
func TestKeyringRereadsChangedDockerConfig(t *testing.T) {
	t.Parallel()
	a := &atomicDir{t: t, dir: t.TempDir()}
	mtime := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	a.write(".dockerconfigjson", `{"auths":{"registry.test":{"username":"old","password":"p"}}}`, mtime)
	path := filepath.Join(a.dir, ".dockerconfigjson")
	k := NewKeyring([]string{path}, "", "")
	if u := lookupUser(t, k, "registry.test/x:1"); u != "old" {
		t.Fatalf("user %q, want old", u)
	}
	parsed := k.files[0].cfg
	k.Refresh()
	if k.files[0].cfg != parsed {
		t.Error("an unchanged file was parsed again")
	}
	a.write(".dockerconfigjson", `{"auths":{"registry.test":{"username":"new","password":"p"}}}`, mtime)
	if u := lookupUser(t, k, "registry.test/x:1"); u != "old" {
		t.Errorf("user %q before Refresh, want old", u)
	}
	k.Refresh()
	if u := lookupUser(t, k, "registry.test/x:1"); u != "new" {
		t.Errorf("user %q after the Secret was rotated, want new", u)
	}

	saved, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(a.dir, "..data")); err != nil {
		t.Fatal(err)
	}
	k.Refresh()
	if p := k.Problems(); len(p) != 1 || lookupUser(t, k, "registry.test/x:1") != "" {
		t.Errorf("file gone: problems %v", p)
	}
	a.write(".dockerconfigjson", string(saved), mtime)
	k.Refresh()
	if p := k.Problems(); len(p) != 0 || lookupUser(t, k, "registry.test/x:1") != "new" {
		t.Errorf("file back: problems %v", p)
	}
}

// The plugin config is kept, with its plugins' cached answers, while its
// content stays the same; a changed config starts afresh; one that did not
// load is tried again at each Refresh.
func TestKeyringReloadsPluginConfigOnlyWhenChanged(t *testing.T) {
	t.Parallel()
	cfg, bin, count := pluginSetup(t, configYAML(providerYAML("p", `"registry.test"`, "1m", map[string]string{
		"PLUGIN_CACHE_KEY": "Registry", "PLUGIN_CACHE_DURATION": "1h", "PLUGIN_PASSWORD": "one",
	})), "p")
	k := NewKeyring(nil, cfg, bin, WithClock(newFakeClock()))
	pass(t, k, "registry.test/a:1")
	pass(t, k, "registry.test/a:1")
	if n := len(runs(t, count)); n != 1 {
		t.Fatalf("%d runs with an unchanged config, want 1", n)
	}
	data, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Dir(cfg), filepath.Base(cfg), string(data)+"\n")
	pass(t, k, "registry.test/a:1")
	if n := len(runs(t, count)); n != 2 {
		t.Errorf("%d runs after the config changed, want 2", n)
	}
	writeFile(t, filepath.Dir(cfg), filepath.Base(cfg), "kind: Nonsense\n")
	k.Refresh()
	if p := k.Problems(); len(p) != 1 {
		t.Errorf("broken config: problems %v", p)
	}
	writeFile(t, filepath.Dir(cfg), filepath.Base(cfg), string(data))
	pass(t, k, "registry.test/a:1")
	if p := k.Problems(); len(p) != 0 || len(runs(t, count)) != 3 {
		t.Errorf("fixed config: problems %v, runs %d", p, len(runs(t, count)))
	}
}

// Lookups of a running pass and a Refresh may overlap (run with -race).
func TestKeyringRefreshWhileLookingUp(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := writeFile(t, dir, "c.json", `{"auths":{"registry.test":{"username":"u0","password":"p"}}}`)
	k := NewKeyring([]string{path}, "", "")
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				creds, err := k.Lookup(context.Background(), "registry.test/x:1")
				if err != nil || len(creds) != 1 {
					t.Errorf("lookup during refresh: %v, %v", creds, err)
					return
				}
				k.Warnings()
				k.Problems()
			}
		}()
	}
	for i := range 50 {
		writeFile(t, dir, "c.json", fmt.Sprintf(`{"auths":{"registry.test":{"username":"u%d","password":"p"}}}`, i))
		k.Refresh()
	}
	close(stop)
	wg.Wait()
	if got := lookupUser(t, k, "registry.test/x:1"); got != "u49" {
		t.Errorf("user %q, want u49", got)
	}
}
