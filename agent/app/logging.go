package app

import (
	"fmt"
	"io"
	"log/slog"

	"github.com/spf13/pflag"
)

// LogOptions are the logging flags every command has.
type LogOptions struct {
	Format string
	Level  string
}

func defaultLogOptions() LogOptions { return LogOptions{Format: "text", Level: "info"} }

func (o *LogOptions) addFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Format, "log-format", o.Format, "text or json.")
	fs.StringVar(&o.Level, "log-level", o.Level, "debug, info, warn or error.")
}

// newLogger is the logger the flags describe, writing to w; its error names the bad flag.
func (o *LogOptions) newLogger(w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.Level)); err != nil {
		return nil, fmt.Errorf("--log-level=%q: %w", o.Level, err)
	}
	ho := &slog.HandlerOptions{Level: level}
	switch o.Format {
	case "json":
		return slog.New(slog.NewJSONHandler(w, ho)), nil
	case "text":
		return slog.New(slog.NewTextHandler(w, ho)), nil
	}
	return nil, fmt.Errorf("--log-format=%q: must be text or json", o.Format)
}
